//! `GpuModel`: the whole forward pass on the GPU, for a batch of sequences
//! of different lengths, with a paged KV cache that grows with use.
//!
//! It mirrors `model::Model::forward` step by step (same inputs, same
//! validation, same outputs), so the CPU reference is its oracle:
//!
//! ```text
//! x = embed_rows(embed_tokens, ids)                               # (T, C)
//! for each layer:
//!     h = rms_norm(x);  q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ (+ bias)
//!     q, k = rope(qk_norm(q)), rope(qk_norm(k));  kv_append(k, v)
//!     x += attention(q, cache) · Woᵀ
//!     h = rms_norm(x)
//!     dense:  x += down(silu(gate(h)) * up(h))
//!     MoE:    logits = h·Wrᵀ; ids, weights = route_topk(logits)   # the routing buffer
//!             [a selection policy may rewrite ids, weights here]
//!             group_by_expert; y = down_e(silu(gate_e(h)) * up_e(h)) per active expert
//!             x += Σ weights · y (+ sigmoid(gate_s(h)) · shared(h))
//! logits = rms_norm(x[last rows]) · lm_headᵀ
//! ```
//!
//! A call's tokens are processed in steps of at most `max_step_tokens`
//! tokens (chunked prefill): a long prompt is split, its later chunks
//! attending to the earlier ones through the cache, so scratch memory is
//! bounded whatever the prompt length. Each step assigns KV pages
//! ([`crate::gpu::kv_cache`]), uploads its inputs, and records every
//! layer's `forward` (`layer.rs`, one type per part of `model.rs`) into one
//! encoder over grow-only scratch buffers (`step.rs`); the head runs only
//! on the rows whose logits are wanted.
//!
//! The caller says with each call ([`StepSpec`]) which logits it wants,
//! whether it is a decode step, and the expert policy; the engine keeps no
//! policy of its own, and returns the step metrics with the logits.

use std::sync::{Arc, Mutex};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{Phase, StepOutput, StepSpec, check_batch};
use crate::gpu::attention::gather_rows;
use crate::gpu::context::{GpuContext, GpuEncoder, GpuTensor, PendingRead};
use crate::gpu::kernels::{embed_rows, matmul_nt, rms_norm_rows};
use crate::gpu::kv_cache::{GpuSequence, KvCache};
use crate::gpu::layer::{GpuFfn, GpuLayer, StepCtx, vec_tensor};
use crate::gpu::selection::log_record_len;
use crate::gpu::step::{Piece, Scratch, StepInputs};
use crate::gpu::upload::{WeightStream, WeightUpload};
use crate::gpu::weights::GpuMatrix;
use crate::metrics::{LayerMetrics, StepMetrics};
use crate::model::{Logits, Model};
use crate::selection::{ExpertPolicy, Resolved};

/// Default step size for chunked prefill.
pub const DEFAULT_STEP_TOKENS: usize = 256;

/// How one forward call routes its MoE layers, fixed for all of its steps.
struct StepRouting {
    decode: bool,
    policy: Resolved,
    /// The policy's name in the step metrics.
    name: String,
    /// Read the routing metrics back.
    metrics: bool,
}

/// The name a step's metrics give its policy: `exact` when it routed exactly.
fn policy_name(resolved: Resolved, policy: ExpertPolicy) -> String {
    match resolved {
        Resolved::Exact => "exact".to_string(),
        _ => policy.to_string(),
    }
}

/// Per-step counters, for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    pub steps: usize,
    pub tokens: usize,
    pub dispatches: u64,
    /// The most GPU memory the allocator reported in use during a step
    /// (sampled once per step, when all of its buffers are alive); 0 where
    /// the backend gives no report.
    pub peak_bytes: u64,
}

pub struct GpuModel {
    pub ctx: Arc<GpuContext>,
    pub config: ModelConfig,
    embed: GpuMatrix,
    /// None when the head is tied to the embedding (the same GPU matrix).
    lm_head: Option<GpuMatrix>,
    norm: GpuTensor,
    layers: Vec<GpuLayer>,
    kv: KvCache,
    /// The most tokens one step (one pass through the layers) processes.
    pub max_step_tokens: usize,
    stats: Mutex<StepStats>,
    /// Grow-only activations: sized for the most tokens a step has needed.
    scratch: Mutex<Option<Scratch>>,
    /// Observers of every step's metrics (`--trace`, the server's expert
    /// stream, the viewer); while any is alive each step reads its routing
    /// metrics back.
    subscribers: Mutex<Vec<std::sync::mpsc::Sender<Arc<StepMetrics>>>>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuModel({:?}, {} layers)", self.config.arch, self.layers.len())
    }
}

impl GpuModel {
    /// Uploads `model`'s weights (in memory) in their stored formats
    /// (F16/BF16 widened to F32). `progress(done, total)` is called after
    /// each layer.
    pub fn upload(ctx: Arc<GpuContext>, model: &Model, progress: impl FnMut(usize, usize)) -> Result<GpuModel> {
        let (gpu, stream) = Self::create(ctx, model, progress)?;
        // Nothing is left to stream for a model in memory; this checks that
        // and finishes the writes.
        stream.finish()?;
        Ok(gpu)
    }

    /// Creates every GPU buffer of `model` and writes the weights that are
    /// in memory; the returned [`WeightStream`] writes the others (a model
    /// built over a streamed GGUF, see [`crate::gpu::GgufStreamLoad`]) as
    /// their bytes arrive. The model is ready once the stream has finished.
    /// This is the one upload path, for files on disk and for streams.
    pub fn create(
        ctx: Arc<GpuContext>,
        model: &Model,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(GpuModel, WeightStream)> {
        let cfg = model.config.clone();
        let mut upload = WeightUpload::default();
        let up = &mut upload;
        let c = &*ctx;
        let embed = GpuMatrix::create(c, &model.embed_tokens, up, c.max_binding_bytes())?;
        let tied = model.lm_head.weight.dtype == model.embed_tokens.dtype
            && model.lm_head.weight.shape == model.embed_tokens.shape
            && model.lm_head.weight.same_storage(&model.embed_tokens);
        let lm_head = if tied {
            None
        } else {
            Some(GpuMatrix::create(c, &model.lm_head.weight, up, c.max_binding_bytes())?)
        };
        if model.lm_head.bias.is_some() {
            return Err(Error::Gpu("an lm_head bias is not supported on the GPU".into()));
        }
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, layer) in model.layers.iter().enumerate() {
            layers.push(GpuLayer::create(c, up, l, layer)?);
            progress(l + 1, model.layers.len());
        }
        let norm = vec_tensor(c, up, "norm", &model.norm)?;
        let kv = KvCache::new(c, &cfg)?;
        let stream = upload.into_stream(ctx.clone())?;
        let gpu = GpuModel {
            ctx,
            config: cfg,
            embed,
            lm_head,
            norm,
            layers,
            kv,
            max_step_tokens: DEFAULT_STEP_TOKENS,
            stats: Mutex::new(StepStats::default()),
            scratch: Mutex::new(None),
            subscribers: Mutex::new(Vec::new()),
        };
        Ok((gpu, stream))
    }

    /// Bytes of KV cache currently allocated on the GPU (all layers).
    pub fn kv_cache_bytes(&self) -> u64 {
        self.kv.bytes()
    }

    /// Bytes of weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let head = self.lm_head.as_ref().map_or(0, |h| h.data_bytes());
        self.embed.data_bytes() + head + self.layers.iter().map(GpuLayer::weight_bytes).sum::<u64>()
    }

    /// Per MoE layer: bytes of one expert's three matrices (what a step
    /// reads per active expert), in layer order; `None` for dense layers.
    pub fn expert_bytes_per_layer(&self) -> Vec<Option<u64>> {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                GpuFfn::Dense(_) => None,
                GpuFfn::Moe(m) => Some(m.expert_bytes()),
            })
            .collect()
    }

    /// Bytes a decode step reads regardless of routing: attention, dense
    /// MLPs, routers, shared experts, norms, and the LM head.
    pub fn dense_bytes_per_step(&self) -> u64 {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).data_bytes();
        head + self.layers.iter().map(GpuLayer::dense_bytes).sum::<u64>()
    }

    /// A stream of every following step's metrics. Collecting them costs
    /// one small read-back per step while any receiver is alive.
    pub fn subscribe(&self) -> std::sync::mpsc::Receiver<Arc<StepMetrics>> {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push(tx);
        }
        rx
    }

    fn has_subscribers(&self) -> bool {
        self.subscribers.lock().map(|s| !s.is_empty()).unwrap_or(false)
    }

    pub fn reset_stats(&self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = StepStats::default();
        }
    }

    pub fn stats(&self) -> StepStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// A fresh sequence with an empty KV cache.
    pub fn new_sequence(&self) -> GpuSequence {
        self.kv.new_sequence()
    }

    /// Runs the new tokens of several sequences through the model with
    /// exact routing, appending them to each sequence's KV cache, and
    /// returns one logits vector per sequence, as `Model::forward` does.
    /// Inputs are validated before any cache is touched. Blocks until the
    /// logits are back (native only): a shorthand for [`GpuModel::run`]
    /// with [`StepSpec::prefill`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward(&self, batch: &mut [(&mut GpuSequence, &[u32])], logits: Logits) -> Result<Vec<Vec<f32>>> {
        self.run_blocking(batch, StepSpec::prefill(logits)).map(|o| o.logits)
    }

    /// [`GpuModel::run`], blocking until the step is done (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_blocking(&self, batch: &mut [(&mut GpuSequence, &[u32])], spec: StepSpec) -> Result<StepOutput> {
        // The read-backs inside poll the device themselves, so the future
        // never waits on anything but the GPU and blocking on it is safe.
        pollster::block_on(self.run(batch, spec))
    }

    /// The forward pass, as a future: the one implementation behind
    /// [`GpuModel::forward`] and [`crate::generate::Engine::run`]. `spec`
    /// says which logits to return, whether this is a decode step, and the
    /// expert policy that rewrites a decode step's routing. Its only waits
    /// are the read-backs of the logits (and of the step metrics), which in
    /// the browser complete on the JS event loop. Calls must not overlap:
    /// the page drives one step at a time.
    pub async fn run(&self, batch: &mut [(&mut GpuSequence, &[u32])], spec: StepSpec) -> Result<StepOutput> {
        let cfg = &self.config;
        let logits = spec.logits;
        check_batch(cfg, batch.iter().map(|(s, t)| (s.len, self.kv.owns(s), *t)))?;
        if self.max_step_tokens == 0 {
            return Err(Error::InvalidArgument("max_step_tokens must be at least 1".into()));
        }
        // Selection policies apply to decode steps only; a prefill routes
        // exactly.
        let resolved = spec.routing(cfg, batch.iter().map(|(s, t)| (s.len, t.len())))?;
        let routing = StepRouting {
            decode: spec.phase == Phase::Decode,
            policy: resolved,
            name: policy_name(resolved, spec.policy),
            metrics: spec.metrics || self.has_subscribers(),
        };

        // Plan the steps: consecutive pieces of each sequence's tokens, at
        // most max_step_tokens per step.
        let mut steps: Vec<Vec<(usize, std::ops::Range<usize>)>> = Vec::new();
        let mut cur: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut room = self.max_step_tokens;
        for (b, (_, tokens)) in batch.iter().enumerate() {
            let mut at = 0;
            while at < tokens.len() {
                if room == 0 {
                    steps.push(std::mem::take(&mut cur));
                    room = self.max_step_tokens;
                }
                let n = room.min(tokens.len() - at);
                cur.push((b, at..at + n));
                at += n;
                room -= n;
            }
        }
        if !cur.is_empty() {
            steps.push(cur);
        }

        let v = cfg.vocab_size;
        let mut metrics = Vec::new();
        let mut out: Vec<Vec<f32>> = batch
            .iter()
            .map(|(_, t)| Vec::with_capacity(if logits == Logits::Last { v } else { t.len() * v }))
            .collect();
        let tokens: Vec<&[u32]> = batch.iter().map(|(_, t)| *t).collect();
        for step in &steps {
            // Rows whose logits we want, and which sequence they belong to.
            let mut want: Vec<(usize, usize)> = Vec::new(); // (row in step, sequence)
            let mut row = 0;
            for (b, r) in step {
                let n = r.len();
                let last_piece = r.end == tokens[*b].len();
                match logits {
                    Logits::Last if last_piece => want.push((row + n - 1, *b)),
                    Logits::Last => {}
                    Logits::All => want.extend((row..row + n).map(|i| (i, *b))),
                }
                row += n;
            }
            // Each sequence appears at most once per step, so piece i is
            // sequence seqs[i].
            let mut refs: Vec<Option<&mut GpuSequence>> = batch.iter_mut().map(|(s, _)| Some(&mut **s)).collect();
            let mut seqs = Vec::with_capacity(step.len());
            let mut pieces = Vec::with_capacity(step.len());
            for (i, (b, r)) in step.iter().enumerate() {
                let seq = refs[*b]
                    .take()
                    .ok_or_else(|| Error::Gpu("a sequence appears twice in one step".into()))?;
                pieces.push(Piece {
                    seq: i,
                    cached: seq.len,
                    tokens: &tokens[*b][r.clone()],
                });
                seqs.push(seq);
            }
            let rows: Vec<usize> = want.iter().map(|(row, _)| *row).collect();
            let (rows, m) = self.step(&mut seqs, &pieces, &rows, &routing).await?;
            metrics.extend(m);
            for ((_, b), r) in want.iter().zip(rows.chunks(v)) {
                out[*b].extend_from_slice(r);
            }
        }
        Ok(StepOutput { logits: out, metrics })
    }

    /// One pass through the layers for `pieces` (`seqs[piece.seq]` is the
    /// piece's sequence). Returns the logits of rows `want` (row index
    /// within the step), concatenated, and the step's metrics when
    /// `routing` asks for them.
    async fn step(
        &self,
        seqs: &mut [&mut GpuSequence],
        pieces: &[Piece<'_>],
        want: &[usize],
        routing: &StepRouting,
    ) -> Result<(Vec<f32>, Option<Arc<StepMetrics>>)> {
        let cfg = &self.config;
        let ctx = &*self.ctx;
        let started = web_time::Instant::now();
        let new: Vec<usize> = pieces.iter().map(|p| p.tokens.len()).collect();
        self.kv.assign_pages(ctx, seqs, &new)?;
        let inputs = StepInputs::new(ctx, cfg, seqs, pieces)?;
        let t = inputs.t;

        // Everything that holds the KV pool and scratch locks is in this block,
        // so they are released before the first await.
        let (logits_read, metric_reads, dispatches) = {
            let kv = self.kv.pool()?;
            let sc = self.scratch_for(t)?;
            let mut enc = ctx.encoder("forward step");
            embed_rows(ctx, &mut enc, &self.embed, &inputs.ids, &sc.x)?;
            let layer_ctx = StepCtx {
                ctx,
                cfg,
                sc: &sc,
                inputs: &inputs,
                policy: routing.policy,
            };
            for (l, (layer, cache)) in self.layers.iter().zip(&kv.layers).enumerate() {
                layer.forward(&layer_ctx, &mut enc, l, cache)?;
            }
            let dispatches = enc.dispatches as u64;
            let logits_read = self.head(enc, &sc.x, want)?;
            self.sample_memory();
            // The metric read-backs are started too before anything is
            // awaited, so one wait serves all of them; nothing is held while
            // the GPU (or, in the browser, the event loop) runs.
            let metric_reads = match (&sc.expert_offsets, routing.metrics) {
                (Some(log), true) => {
                    let offsets = ctx.start_read(log.buffer(), log.data_bytes(), "reading the expert offsets back")?;
                    let plog = match &sc.policy_log {
                        Some(l) => Some(ctx.start_read(l.buffer(), l.data_bytes(), "reading the policy log back")?),
                        None => None,
                    };
                    Some((offsets, plog, log.shape[1]))
                }
                _ => None,
            };
            (logits_read, metric_reads, dispatches)
        };
        let result = match logits_read {
            Some(read) => bytemuck::pod_collect_to_vec(&ctx.finish_read(read).await?),
            None => Vec::new(),
        };
        let mut step_metrics = None;
        if let Some((offsets, plog, e1)) = metric_reads {
            let offsets: Vec<u32> = bytemuck::pod_collect_to_vec(&ctx.finish_read(offsets).await?);
            let plog: Vec<u32> = match plog {
                Some(read) => bytemuck::pod_collect_to_vec(&ctx.finish_read(read).await?),
                None => Vec::new(),
            };
            let m = self.metrics_from(&offsets, e1, &plog, t, routing.decode, routing.name.clone(), started);
            step_metrics = Some(self.publish(m));
        }
        for p in pieces {
            seqs[p.seq].len += p.tokens.len();
        }
        if let Ok(mut s) = self.stats.lock() {
            s.steps += 1;
            s.tokens += t;
            s.dispatches += dispatches;
        }
        Ok((result, step_metrics))
    }

    /// The step's scratch seen at `t` tokens, growing the buffers first
    /// when no earlier step needed as many.
    fn scratch_for(&self, t: usize) -> Result<Scratch> {
        let mut slot = self
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch lock poisoned".into()))?;
        if slot.as_ref().is_none_or(|s| s.tokens < t) {
            // Free the smaller buffers before allocating the larger ones.
            *slot = None;
            *slot = Some(Scratch::new(&self.ctx, &self.config, &self.layers, t)?);
        }
        let k = self.config.moe.as_ref().map_or(0, |m| m.top_k);
        slot.as_ref()
            .ok_or_else(|| Error::Gpu("step scratch missing".into()))?
            .view(t, k)
    }

    /// Records the final norm and the LM head on rows `want` of `x` and
    /// submits the step; returns the started read-back of their logits
    /// (none when no row is wanted, as in a prefill chunk before the last).
    fn head(&self, mut enc: GpuEncoder, x: &GpuTensor, want: &[usize]) -> Result<Option<PendingRead>> {
        let (ctx, cfg) = (&*self.ctx, &self.config);
        let r = want.len();
        if r == 0 {
            ctx.submit(enc)?;
            return Ok(None);
        }
        let c = cfg.hidden_size;
        let idx = ctx.upload_u32("logit rows", &want.iter().map(|&i| i as u32).collect::<Vec<_>>(), &[r])?;
        let picked = ctx.zeros_f32("logit rows of x", &[r, c])?;
        gather_rows(ctx, &mut enc, x, &idx, &picked)?;
        let normed = ctx.zeros_f32("final norm", &[r, c])?;
        rms_norm_rows(ctx, &mut enc, &picked, &self.norm, &normed, c, cfg.rms_norm_eps)?;
        let logits = ctx.zeros_f32("logits", &[r, cfg.vocab_size])?;
        matmul_nt(
            ctx,
            &mut enc,
            &normed,
            self.lm_head.as_ref().unwrap_or(&self.embed),
            None,
            &logits,
        )?;
        ctx.submit(enc)?;
        Ok(Some(ctx.start_read(
            logits.buffer(),
            logits.data_bytes(),
            "reading the logits back",
        )?))
    }

    /// Turns a step's read-back expert offsets ((L, e1) u32) and policy log
    /// into [`StepMetrics`].
    #[allow(clippy::too_many_arguments)]
    fn metrics_from(
        &self,
        offsets: &[u32],
        e1: usize,
        plog: &[u32],
        t: usize,
        decode: bool,
        policy: String,
        started: web_time::Instant,
    ) -> StepMetrics {
        let k = self.config.moe.as_ref().map_or(0, |m| m.top_k);
        let exact = policy == "exact";
        let rec = log_record_len(t, k);
        let mut layers = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let GpuFfn::Moe(moe) = &layer.ffn else { continue };
            let counts: Vec<u32> = offsets[l * e1..(l + 1) * e1].windows(2).map(|w| w[1] - w[0]).collect();
            let selected = counts.iter().filter(|&&n| n > 0).count();
            let r = &plog[l * rec..(l + 1) * rec];
            let (distinct_exact, bins, remapped) = if exact {
                (selected, Vec::new(), Vec::new())
            } else {
                (
                    r[0] as usize,
                    r[1..1 + t * k].iter().map(|&v| v as i32).collect(),
                    r[1 + t * k..1 + 2 * t * k].iter().map(|&v| v != 0).collect(),
                )
            };
            let per_expert = moe.expert_bytes();
            layers.push(LayerMetrics {
                layer: l,
                distinct_exact,
                distinct_selected: selected,
                tokens_per_expert: counts,
                bins,
                remapped,
                expert_bytes: selected as u64 * per_expert,
            });
        }
        let step = self.stats().steps as u64;
        StepMetrics {
            step,
            policy,
            decode,
            tokens: t,
            top_k: k,
            layers,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// Sends a step's metrics to every subscriber and returns them for the
    /// step's output.
    fn publish(&self, m: StepMetrics) -> Arc<StepMetrics> {
        let m = Arc::new(m);
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.retain(|tx| tx.send(m.clone()).is_ok());
        }
        m
    }

    /// Notes the allocator's current total in the peak-memory statistic.
    fn sample_memory(&self) {
        if let Some(bytes) = self.ctx.allocated_bytes()
            && let Ok(mut s) = self.stats.lock()
        {
            s.peak_bytes = s.peak_bytes.max(bytes);
        }
    }
}
