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
//! bounded whatever the prompt length.
//!
//! The KV cache of every layer is a pool of pages of [`KV_PAGE`] tokens
//! shared by all sequences; a [`GpuSequence`] owns a list of pages. The pool
//! doubles when it runs out (copying the old pages on the GPU), a sequence's
//! pages return to the pool when it is dropped, and the pool shrinks back to
//! its initial size once no sequence holds pages.

use std::sync::{Arc, Mutex};

use crate::config::{ModelConfig, QkNorm};
use crate::error::{Error, Result};
use crate::generate::{Phase, StepOutput, StepSpec, check_decode};
use crate::gpu::attention::{AttentionShape, attention, clamp, gather_rows, kv_append};
use crate::gpu::context::Elem;
use crate::gpu::context::{GpuContext, GpuEncoder, GpuTensor};
use crate::gpu::kernels::{add, embed_rows, matmul_nt, rms_norm_rows, rope_heads, silu_mul};
use crate::gpu::moe::{GpuExperts, Grouping, MoeInput, Routing, group_by_expert, moe_combine, moe_matmul, route_topk};
use crate::gpu::selection::{PolicyBuffers, apply_policy, log_record_len};
use crate::gpu::upload::{Convert, Part, WeightStream, WeightUpload};
use crate::gpu::weights::GpuMatrix;
use crate::linear::QLinear;
use crate::metrics::{LayerMetrics, StepMetrics};
use crate::model::{Ffn, Logits, Mlp, Model};
use crate::selection::{ExpertPolicy, Resolved};
use crate::tensor::{DType, WeightVec};

/// Tokens per KV-cache page.
pub const KV_PAGE: usize = 16;
/// Pages in a fresh pool (per layer, for keys and for values each).
const INITIAL_PAGES: usize = 64;
/// Default step size for chunked prefill.
pub const DEFAULT_STEP_TOKENS: usize = 256;

/// A linear layer on the GPU: weight in its stored format, optional f32 bias.
#[derive(Debug)]
pub struct GpuLinear {
    pub w: GpuMatrix,
    pub bias: Option<GpuTensor>,
}

impl GpuLinear {
    fn create(ctx: &GpuContext, up: &mut WeightUpload, l: &QLinear) -> Result<GpuLinear> {
        let w = GpuMatrix::create(ctx, &l.weight, up, ctx.max_binding_bytes())?;
        let bias = match &l.bias {
            Some(b) => Some(vec_tensor(ctx, up, &format!("{} bias", l.weight.name), b)?),
            None => None,
        };
        Ok(GpuLinear { w, bias })
    }

    fn forward(&self, ctx: &GpuContext, enc: &mut GpuEncoder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        matmul_nt(ctx, enc, x, &self.w, self.bias.as_ref(), y)
    }
}

#[derive(Debug)]
struct GpuMlp {
    gate_proj: GpuLinear,
    up_proj: GpuLinear,
    down_proj: GpuLinear,
}

impl GpuMlp {
    fn create(ctx: &GpuContext, up: &mut WeightUpload, m: &Mlp) -> Result<GpuMlp> {
        Ok(GpuMlp {
            gate_proj: GpuLinear::create(ctx, up, &m.gate_proj)?,
            up_proj: GpuLinear::create(ctx, up, &m.up_proj)?,
            down_proj: GpuLinear::create(ctx, up, &m.down_proj)?,
        })
    }

    /// `bufs[3] = down(silu(gate(h)) * up(h))` for h (T, C), with `bufs` =
    /// gate, up, act scratch (T, at least I) and the output (T, C).
    fn forward(&self, ctx: &GpuContext, enc: &mut GpuEncoder, h: &GpuTensor, bufs: &[GpuTensor; 4]) -> Result<()> {
        let [g, u, a, out] = bufs;
        self.gate_proj.forward(ctx, enc, h, g)?;
        self.up_proj.forward(ctx, enc, h, u)?;
        silu_mul(ctx, enc, g, u, a)?;
        self.down_proj.forward(ctx, enc, a, out)
    }
}

#[derive(Debug)]
struct GpuMoe {
    /// Router (E, C), kept in f32 by the exporters.
    router: GpuLinear,
    gate_proj: GpuExperts,
    up_proj: GpuExperts,
    down_proj: GpuExperts,
    shared: Option<(GpuMlp, GpuLinear)>,
}

#[derive(Debug)]
enum GpuFfn {
    Dense(GpuMlp),
    Moe(GpuMoe),
}

#[derive(Debug)]
struct GpuLayer {
    input_layernorm: GpuTensor,
    q_proj: GpuLinear,
    k_proj: GpuLinear,
    v_proj: GpuLinear,
    o_proj: GpuLinear,
    q_norm: Option<GpuTensor>,
    k_norm: Option<GpuTensor>,
    post_attention_layernorm: GpuTensor,
    ffn: GpuFfn,
}

/// Free pages of the KV pool. Shared with every [`GpuSequence`], which gives
/// its pages back when dropped.
#[derive(Debug, Default)]
struct PageAllocator {
    capacity: usize,
    free: Vec<u32>,
}

/// Per-layer key and value pools, each (capacity * KV_PAGE, Hkv * D).
struct KvPool {
    layers: Vec<(GpuTensor, GpuTensor)>,
}

/// A sequence's GPU state: its length and KV pages. Dropping it frees its pages.
pub struct GpuSequence {
    len: usize,
    pages: Vec<u32>,
    alloc: Arc<Mutex<PageAllocator>>,
}

impl GpuSequence {
    /// Tokens already in this sequence's KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the tokens from position `len` on (nothing when `len` is not
    /// below [`GpuSequence::len`]) and frees the KV pages they alone used;
    /// the next forward step continues at position `len`. This re-runs
    /// decoding from a shared prompt, as `lynx bench` does per policy, or
    /// regenerates a reply without prefilling the conversation again.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        let freed = self.pages.split_off(len.div_ceil(KV_PAGE));
        let mut a = match self.alloc.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        a.free.extend(freed);
    }
}

impl Drop for GpuSequence {
    fn drop(&mut self) {
        // A poisoned lock means another thread panicked mid-update; the free
        // list is still a list of page ids, so returning ours is safe.
        let mut a = match self.alloc.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        a.free.append(&mut self.pages);
    }
}

/// The activations of one step of T tokens, reused by every layer (the
/// kernels of a step run in order, each pass seeing the previous one's
/// writes) and by the next step when it has the same T, as decode steps do.
struct Scratch {
    t: usize,
    x: GpuTensor,
    h: GpuTensor,
    q: GpuTensor,
    qn: GpuTensor,
    k: GpuTensor,
    kn: GpuTensor,
    v: GpuTensor,
    att: GpuTensor,
    o: GpuTensor,
    /// Dense MLPs (and shared experts), per intermediate size I: gate, up,
    /// act (T, I) and the output (T, C).
    mlp: Vec<(usize, [GpuTensor; 4])>,
    moe: Option<MoeScratch>,
    /// (L, E + 1) u32: each MoE layer's expert offsets of this step, copied
    /// from the grouping after the layer ran (rows of dense layers stay 0).
    expert_offsets: Option<GpuTensor>,
    /// (L, 1 + 2 * T * K) u32: the selection policy's log per layer (see
    /// `gpu::selection`).
    policy_log: Option<GpuTensor>,
}

impl Scratch {
    /// The MLP scratch for `mlp`'s intermediate size.
    fn mlp_for(&self, mlp: &GpuMlp) -> Result<&[GpuTensor; 4]> {
        let i = mlp.gate_proj.w.rows;
        self.mlp
            .iter()
            .find(|(n, _)| *n == i)
            .map(|(_, b)| b)
            .ok_or_else(|| Error::Gpu(format!("no MLP scratch of intermediate size {i}")))
    }
}

struct MoeScratch {
    routing: Routing,
    grouping: Grouping,
    policy: PolicyBuffers,
    gy: GpuTensor,
    uy: GpuTensor,
    act: GpuTensor,
    dy: GpuTensor,
    /// The shared expert's gate logit (T, 1); its output goes to the MLP scratch.
    shared_gate: Option<GpuTensor>,
}

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
    alloc: Arc<Mutex<PageAllocator>>,
    kv: Mutex<KvPool>,
    /// The most tokens one step (one pass through the layers) processes.
    pub max_step_tokens: usize,
    stats: Mutex<StepStats>,
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

/// A weight vector (norm, bias) as an f32 tensor, written from its stored
/// tensor like every other weight (so it can be streamed too).
fn vec_tensor(ctx: &GpuContext, up: &mut WeightUpload, label: &str, v: &WeightVec) -> Result<GpuTensor> {
    let t = &v.tensor;
    let n = t.numel();
    let buffer = match t.dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let part = Part {
                tensor: t,
                bytes: 0..t.byte_range().len(),
                convert: Convert::between(t.dtype, DType::F32),
            };
            up.buffer(ctx, label, n as u64 * 4, true, &[part])?
        }
        // No known checkpoint quantises a vector; one in memory is decoded
        // already, and a streamed one cannot be decoded in pieces.
        _ if t.is_resident() => ctx.upload_f32(label, &v.values, &[n])?.buffer,
        d => {
            return Err(Error::Gpu(format!(
                "vector `{}` is stored as {d}; a streamed vector must be F32, F16 or BF16",
                t.name
            )));
        }
    };
    Ok(GpuTensor {
        buffer,
        shape: vec![n],
        elem: Elem::F32,
    })
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
            let a = &layer.self_attn;
            let ffn = match &layer.ffn {
                Ffn::Dense(m) => GpuFfn::Dense(GpuMlp::create(c, up, m)?),
                Ffn::Moe(moe) => {
                    let pick = |f: fn(&Mlp) -> &QLinear| moe.experts.iter().map(|e| &f(e).weight).collect::<Vec<_>>();
                    if moe
                        .experts
                        .iter()
                        .any(|e| e.gate_proj.bias.is_some() || e.down_proj.bias.is_some())
                    {
                        return Err(Error::Gpu(format!(
                            "layer {l}: expert biases are not supported on the GPU"
                        )));
                    }
                    let shared = match &moe.shared_expert {
                        Some((m, g)) => Some((GpuMlp::create(c, up, m)?, GpuLinear::create(c, up, g)?)),
                        None => None,
                    };
                    GpuFfn::Moe(GpuMoe {
                        router: GpuLinear::create(c, up, &moe.gate)?,
                        gate_proj: GpuExperts::create(
                            c,
                            &format!("layers.{l}.experts.gate_proj"),
                            &pick(|m| &m.gate_proj),
                            up,
                        )?,
                        up_proj: GpuExperts::create(
                            c,
                            &format!("layers.{l}.experts.up_proj"),
                            &pick(|m| &m.up_proj),
                            up,
                        )?,
                        down_proj: GpuExperts::create(
                            c,
                            &format!("layers.{l}.experts.down_proj"),
                            &pick(|m| &m.down_proj),
                            up,
                        )?,
                        shared,
                    })
                }
            };
            layers.push(GpuLayer {
                input_layernorm: vec_tensor(c, up, &format!("layers.{l}.input_layernorm"), &layer.input_layernorm)?,
                q_proj: GpuLinear::create(c, up, &a.q_proj)?,
                k_proj: GpuLinear::create(c, up, &a.k_proj)?,
                v_proj: GpuLinear::create(c, up, &a.v_proj)?,
                o_proj: GpuLinear::create(c, up, &a.o_proj)?,
                q_norm: a
                    .q_norm
                    .as_ref()
                    .map(|w| vec_tensor(c, up, &format!("layers.{l}.q_norm"), w))
                    .transpose()?,
                k_norm: a
                    .k_norm
                    .as_ref()
                    .map(|w| vec_tensor(c, up, &format!("layers.{l}.k_norm"), w))
                    .transpose()?,
                post_attention_layernorm: vec_tensor(
                    c,
                    up,
                    &format!("layers.{l}.post_attention_layernorm"),
                    &layer.post_attention_layernorm,
                )?,
                ffn,
            });
            progress(l + 1, model.layers.len());
        }
        let norm = vec_tensor(c, up, "norm", &model.norm)?;
        let kv = Self::new_pool(c, &cfg, INITIAL_PAGES)?;
        let alloc = PageAllocator {
            capacity: INITIAL_PAGES,
            free: (0..INITIAL_PAGES as u32).rev().collect(),
        };
        let stream = upload.into_stream(ctx.clone())?;
        let gpu = GpuModel {
            ctx,
            config: cfg,
            embed,
            lm_head,
            norm,
            layers,
            alloc: Arc::new(Mutex::new(alloc)),
            kv: Mutex::new(kv),
            max_step_tokens: DEFAULT_STEP_TOKENS,
            stats: Mutex::new(StepStats::default()),
            scratch: Mutex::new(None),
            subscribers: Mutex::new(Vec::new()),
        };
        Ok((gpu, stream))
    }

    fn new_pool(ctx: &GpuContext, cfg: &ModelConfig, pages: usize) -> Result<KvPool> {
        let width = cfg.num_kv_heads * cfg.head_dim;
        let rows = pages * KV_PAGE;
        let bytes = (rows * width * 4) as u64;
        if bytes > ctx.max_binding_bytes() {
            return Err(Error::Gpu(format!(
                "the KV cache needs {pages} pages ({} MiB per layer for keys), more than one storage binding \
                 of this device holds ({} MiB); use fewer or shorter sequences",
                bytes >> 20,
                ctx.max_binding_bytes() >> 20
            )));
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            layers.push((
                ctx.zeros_f32(&format!("layers.{l} key cache ({pages} pages)"), &[rows, width])?,
                ctx.zeros_f32(&format!("layers.{l} value cache ({pages} pages)"), &[rows, width])?,
            ));
        }
        Ok(KvPool { layers })
    }

    fn new_scratch(&self, t: usize) -> Result<Scratch> {
        let ctx = &*self.ctx;
        let cfg = &self.config;
        let (c, h, hkv, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let f = |label: &str, shape: &[usize]| ctx.zeros_f32(label, shape);
        // Intermediate sizes of the dense MLPs: dense layers and shared experts.
        let mut dense_sizes = Vec::new();
        let mut moe_dims = None;
        for l in &self.layers {
            match &l.ffn {
                GpuFfn::Dense(m) => dense_sizes.push(m.gate_proj.w.rows),
                GpuFfn::Moe(m) => {
                    if let Some((s, _)) = &m.shared {
                        dense_sizes.push(s.gate_proj.w.rows);
                    }
                    moe_dims = Some((m.gate_proj.experts, m.gate_proj.rows, m.shared.is_some()));
                }
            }
        }
        dense_sizes.sort_unstable();
        dense_sizes.dedup();
        let mut mlp = Vec::new();
        for i in dense_sizes {
            mlp.push((
                i,
                [
                    f("mlp gate", &[t, i])?,
                    f("mlp up", &[t, i])?,
                    f("mlp act", &[t, i])?,
                    f("mlp output", &[t, c])?,
                ],
            ));
        }
        let moe = match (moe_dims, &cfg.moe) {
            (Some((e, i, shared)), Some(mc)) => {
                let k = mc.top_k;
                Some(MoeScratch {
                    routing: Routing {
                        logits: f("router logits", &[t, e])?,
                        ids: ctx.zeros_u32("routing expert ids", &[t, k])?,
                        weights: f("routing weights", &[t, k])?,
                    },
                    grouping: Grouping::new(ctx, t, e, k)?,
                    policy: PolicyBuffers::new(ctx, e)?,
                    gy: f("experts gate", &[t * k, i])?,
                    uy: f("experts up", &[t * k, i])?,
                    act: f("experts act", &[t * k, i])?,
                    dy: f("experts down", &[t * k, c])?,
                    shared_gate: if shared {
                        Some(f("shared expert gate", &[t, 1])?)
                    } else {
                        None
                    },
                })
            }
            _ => None,
        };
        let expert_offsets = match moe_dims {
            Some((e, _, _)) => Some(ctx.zeros_u32("per-layer expert offsets", &[cfg.num_layers, e + 1])?),
            None => None,
        };
        let policy_log = match (moe_dims, &cfg.moe) {
            (Some(_), Some(mc)) => {
                Some(ctx.zeros_u32("per-layer policy log", &[cfg.num_layers, log_record_len(t, mc.top_k)])?)
            }
            _ => None,
        };
        Ok(Scratch {
            t,
            expert_offsets,
            policy_log,
            x: f("x (residual stream)", &[t, c])?,
            h: f("h (normed)", &[t, c])?,
            q: f("q", &[t, h * d])?,
            qn: f("q normed", &[t, h * d])?,
            k: f("k", &[t, hkv * d])?,
            kn: f("k normed", &[t, hkv * d])?,
            v: f("v", &[t, hkv * d])?,
            att: f("attention output", &[t, h * d])?,
            o: f("o_proj output", &[t, c])?,
            mlp,
            moe,
        })
    }

    /// Bytes of KV cache currently allocated on the GPU (all layers).
    pub fn kv_cache_bytes(&self) -> u64 {
        self.kv.lock().map_or(0, |kv| {
            kv.layers.iter().map(|(k, v)| k.data_bytes() + v.data_bytes()).sum()
        })
    }

    /// Bytes of weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let lin = |l: &GpuLinear| l.w.data_bytes();
        let mlp = |m: &GpuMlp| lin(&m.gate_proj) + lin(&m.up_proj) + lin(&m.down_proj);
        let mut total = self.embed.data_bytes() + self.lm_head.as_ref().map_or(0, |h| h.data_bytes());
        for l in &self.layers {
            total += lin(&l.q_proj) + lin(&l.k_proj) + lin(&l.v_proj) + lin(&l.o_proj);
            total += match &l.ffn {
                GpuFfn::Dense(m) => mlp(m),
                GpuFfn::Moe(m) => {
                    lin(&m.router)
                        + (m.gate_proj.expert_bytes() + m.up_proj.expert_bytes() + m.down_proj.expert_bytes())
                            * m.gate_proj.experts as u64
                        + m.shared.as_ref().map_or(0, |(s, g)| mlp(s) + lin(g))
                }
            };
        }
        total
    }

    /// Per MoE layer: bytes of one expert's three matrices (what a step
    /// reads per active expert), in layer order; `None` for dense layers.
    pub fn expert_bytes_per_layer(&self) -> Vec<Option<u64>> {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                GpuFfn::Dense(_) => None,
                GpuFfn::Moe(m) => {
                    Some(m.gate_proj.expert_bytes() + m.up_proj.expert_bytes() + m.down_proj.expert_bytes())
                }
            })
            .collect()
    }

    /// Bytes a decode step reads regardless of routing: attention, dense
    /// MLPs, routers, shared experts, norms, and the LM head.
    pub fn dense_bytes_per_step(&self) -> u64 {
        let lin = |l: &GpuLinear| l.w.data_bytes();
        let mlp = |m: &GpuMlp| lin(&m.gate_proj) + lin(&m.up_proj) + lin(&m.down_proj);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).data_bytes();
        let mut total = head;
        for l in &self.layers {
            total += lin(&l.q_proj) + lin(&l.k_proj) + lin(&l.v_proj) + lin(&l.o_proj);
            total += match &l.ffn {
                GpuFfn::Dense(m) => mlp(m),
                GpuFfn::Moe(m) => lin(&m.router) + m.shared.as_ref().map_or(0, |(s, g)| mlp(s) + lin(g)),
            };
        }
        total
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
        GpuSequence {
            len: 0,
            pages: Vec::new(),
            alloc: self.alloc.clone(),
        }
    }

    /// Runs the new tokens of several sequences through the model with
    /// exact routing, appending them to each sequence's KV cache, and
    /// returns one logits vector per sequence, as `Model::forward` does.
    /// Inputs are validated before any cache is touched. Blocks until the
    /// logits are back (native only): a shorthand for [`GpuModel::run`]
    /// with [`StepSpec::prefill`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward(&self, batch: &mut [(&mut GpuSequence, &[u32])], logits: Logits) -> Result<Vec<Vec<f32>>> {
        // The read-backs inside poll the device themselves, so the future
        // never waits on anything but the GPU and blocking on it is safe.
        pollster::block_on(self.run(batch, StepSpec::prefill(logits))).map(|o| o.logits)
    }

    /// [`GpuModel::run`], blocking until the step is done (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_blocking(&self, batch: &mut [(&mut GpuSequence, &[u32])], spec: StepSpec) -> Result<StepOutput> {
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
        for (seq, tokens) in batch.iter() {
            if tokens.is_empty() {
                return Err(Error::InvalidArgument("forward: a sequence has no new tokens".into()));
            }
            if !Arc::ptr_eq(&seq.alloc, &self.alloc) {
                return Err(Error::InvalidArgument(
                    "forward: sequence belongs to another model".into(),
                ));
            }
            let requested = seq.len + tokens.len();
            if requested > cfg.max_position_embeddings {
                return Err(Error::ContextOverflow {
                    requested,
                    limit: cfg.max_position_embeddings,
                });
            }
            if let Some(&id) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: cfg.vocab_size,
                });
            }
        }
        if self.max_step_tokens == 0 {
            return Err(Error::InvalidArgument("max_step_tokens must be at least 1".into()));
        }
        // Selection policies apply to decode steps only; a prefill, or a
        // step that carries prefill chunks, routes exactly.
        let (decode, resolved) = match spec.phase {
            Phase::Prefill => (false, Resolved::Exact),
            Phase::Decode => {
                check_decode(batch.iter().map(|(s, t)| (s.len, t.len())))?;
                (true, spec.policy.resolve_for(cfg)?)
            }
        };
        let routing = StepRouting {
            decode,
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
        for step in &steps {
            let pieces: Vec<(usize, usize, &[u32])> = step
                .iter()
                .map(|(b, r)| {
                    let toks: &[u32] = batch[*b].1;
                    (*b, batch[*b].0.len, &toks[r.clone()])
                })
                .collect();
            // Rows whose logits we want, and which sequence they belong to.
            let mut want: Vec<(usize, usize)> = Vec::new(); // (row in step, sequence)
            let mut row = 0;
            for (b, r) in step {
                let n = r.len();
                let last_piece = r.end == batch[*b].1.len();
                match logits {
                    Logits::Last if last_piece => want.push((row + n - 1, *b)),
                    Logits::Last => {}
                    Logits::All => want.extend((row..row + n).map(|i| (i, *b))),
                }
                row += n;
            }
            let rows = {
                let mut seqs: Vec<&mut GpuSequence> = Vec::new();
                // Each sequence appears at most once per step.
                let mut taken = vec![false; batch.len()];
                let mut order = Vec::new();
                for (b, _) in step {
                    if !taken[*b] {
                        taken[*b] = true;
                        order.push(*b);
                    }
                }
                let mut refs: Vec<Option<&mut GpuSequence>> = batch.iter_mut().map(|(s, _)| Some(&mut **s)).collect();
                for b in &order {
                    if let Some(s) = refs[*b].take() {
                        seqs.push(s);
                    }
                }
                let (rows, m) = self.step(&mut seqs, &order, &pieces, &want, &routing).await?;
                metrics.extend(m);
                rows
            };
            for ((_, b), r) in want.iter().zip(rows.chunks(v)) {
                out[*b].extend_from_slice(r);
            }
        }
        Ok(StepOutput { logits: out, metrics })
    }

    /// One pass through the layers for `pieces` = (sequence, its cached
    /// length, new tokens); `seqs[i]` is sequence `order[i]`. Returns the
    /// logits of rows `want` (row index within the step), concatenated.
    async fn step(
        &self,
        seqs: &mut [&mut GpuSequence],
        order: &[usize],
        pieces: &[(usize, usize, &[u32])],
        want: &[(usize, usize)],
        routing: &StepRouting,
    ) -> Result<(Vec<f32>, Option<Arc<StepMetrics>>)> {
        let cfg = &self.config;
        let ctx = &*self.ctx;
        let started = web_time::Instant::now();
        let (c, h, hkv, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let t: usize = pieces.iter().map(|(_, _, p)| p.len()).sum();
        let slot = |b: usize| order.iter().position(|&o| o == b).unwrap_or(0);
        let resolved = routing.policy;

        // Pages: make sure each sequence has room for its new tokens.
        let mut need = 0;
        for (b, len, toks) in pieces {
            let s = &seqs[slot(*b)];
            need += (len + toks.len()).div_ceil(KV_PAGE).saturating_sub(s.pages.len());
        }
        self.reserve_pages(need)?;
        {
            let mut a = self
                .alloc
                .lock()
                .map_err(|_| Error::Gpu("KV page allocator lock poisoned".into()))?;
            for (b, len, toks) in pieces {
                let s = &mut seqs[slot(*b)];
                while s.pages.len() < (len + toks.len()).div_ceil(KV_PAGE) {
                    let p = a
                        .free
                        .pop()
                        .ok_or_else(|| Error::Gpu("KV page allocator ran dry".into()))?;
                    s.pages.push(p);
                }
            }
        }

        // Per-token inputs.
        let max_pages = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut tok = Vec::with_capacity(2 * t);
        let mut dest = Vec::with_capacity(t);
        let mut max_keys = 0;
        for (b, len, toks) in pieces {
            let i = slot(*b);
            let s = &seqs[i];
            for (j, &id) in toks.iter().enumerate() {
                let p = len + j;
                ids.push(id);
                pos.push(p as u32);
                tok.extend([i as u32, p as u32]);
                dest.push(s.pages[p / KV_PAGE] * KV_PAGE as u32 + (p % KV_PAGE) as u32);
                let first = cfg.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
                max_keys = max_keys.max(p + 1 - first);
            }
        }
        let mut table = vec![0u32; seqs.len() * max_pages];
        for (i, s) in seqs.iter().enumerate() {
            table[i * max_pages..i * max_pages + s.pages.len()].copy_from_slice(&s.pages);
        }
        let ids_t = ctx.upload_u32("step token ids", &ids, &[t])?;
        let pos_t = ctx.upload_u32("step positions", &pos, &[t])?;
        let tok_t = ctx.upload_u32("step (sequence, position)", &tok, &[t, 2])?;
        let dest_t = ctx.upload_u32("step cache rows", &dest, &[t])?;
        let pages_t = ctx.upload_u32("step page table", &table, &[seqs.len(), max_pages])?;

        // Everything that holds the KV pool and scratch locks is in this block,
        // so they are released before the first await.
        let (logits_read, metric_reads, dispatches) = {
            let kv = self.kv.lock().map_err(|_| Error::Gpu("KV pool lock poisoned".into()))?;
            let mut scratch_slot = self
                .scratch
                .lock()
                .map_err(|_| Error::Gpu("scratch lock poisoned".into()))?;
            if scratch_slot.as_ref().is_none_or(|s| s.t != t) {
                // Free the old step's buffers before allocating the new ones.
                *scratch_slot = None;
                *scratch_slot = Some(self.new_scratch(t)?);
            }
            let sc = scratch_slot
                .as_ref()
                .ok_or_else(|| Error::Gpu("step scratch missing".into()))?;
            let mut enc = ctx.encoder("forward step");
            let x = &sc.x;
            embed_rows(ctx, &mut enc, &self.embed, &ids_t, x)?;
            let shape = AttentionShape {
                heads: h,
                kv_heads: hkv,
                head_dim: d,
                page: KV_PAGE,
                max_pages,
                max_keys,
                sliding_window: cfg.sliding_window,
            };
            for (l, layer) in self.layers.iter().enumerate() {
                rms_norm_rows(ctx, &mut enc, x, &layer.input_layernorm, &sc.h, c, cfg.rms_norm_eps)?;
                layer.q_proj.forward(ctx, &mut enc, &sc.h, &sc.q)?;
                layer.k_proj.forward(ctx, &mut enc, &sc.h, &sc.k)?;
                layer.v_proj.forward(ctx, &mut enc, &sc.h, &sc.v)?;
                // q/k norm: over the whole vector (OLMoE) or each head (Qwen3).
                let norm_len = |heads: usize| {
                    if cfg.qk_norm == QkNorm::PerHead { d } else { heads * d }
                };
                let mut q = &sc.q;
                let mut k = &sc.k;
                if let Some(w) = &layer.q_norm {
                    rms_norm_rows(ctx, &mut enc, q, w, &sc.qn, norm_len(h), cfg.rms_norm_eps)?;
                    q = &sc.qn;
                }
                if let Some(w) = &layer.k_norm {
                    rms_norm_rows(ctx, &mut enc, k, w, &sc.kn, norm_len(hkv), cfg.rms_norm_eps)?;
                    k = &sc.kn;
                }
                if let Some(limit) = cfg.clip_qkv {
                    for x in [q, k, &sc.v] {
                        clamp(ctx, &mut enc, x, limit)?;
                    }
                }
                rope_heads(ctx, &mut enc, q, &pos_t, h, d, cfg.rope_theta, cfg.rope_style)?;
                rope_heads(ctx, &mut enc, k, &pos_t, hkv, d, cfg.rope_theta, cfg.rope_style)?;
                let (kc, vc) = &kv.layers[l];
                kv_append(ctx, &mut enc, k, &sc.v, &dest_t, kc, vc)?;
                attention(ctx, &mut enc, &shape, q, kc, vc, &tok_t, &pages_t, &sc.att)?;
                layer.o_proj.forward(ctx, &mut enc, &sc.att, &sc.o)?;
                add(ctx, &mut enc, x, &sc.o)?;

                rms_norm_rows(
                    ctx,
                    &mut enc,
                    x,
                    &layer.post_attention_layernorm,
                    &sc.h,
                    c,
                    cfg.rms_norm_eps,
                )?;
                match &layer.ffn {
                    GpuFfn::Dense(mlp) => {
                        let bufs = sc.mlp_for(mlp)?;
                        mlp.forward(ctx, &mut enc, &sc.h, bufs)?;
                        add(ctx, &mut enc, x, &bufs[3])?;
                    }
                    GpuFfn::Moe(moe) => self.moe(ctx, &mut enc, moe, sc, t, l, resolved)?,
                }
            }

            // Final norm and head, only on the wanted rows.
            let r = want.len();
            let dispatches = enc.dispatches as u64;
            let logits_read = if r == 0 {
                ctx.submit(enc)?;
                self.sample_memory();
                None
            } else {
                let idx = ctx.upload_u32(
                    "logit rows",
                    &want.iter().map(|(i, _)| *i as u32).collect::<Vec<_>>(),
                    &[r],
                )?;
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
                self.sample_memory();
                Some(ctx.start_read(logits.buffer(), logits.data_bytes(), "reading the logits back")?)
            };
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
        for (b, _, toks) in pieces {
            seqs[slot(*b)].len += toks.len();
        }
        if let Ok(mut s) = self.stats.lock() {
            s.steps += 1;
            s.tokens += t;
            s.dispatches += dispatches;
        }
        Ok((result, step_metrics))
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
            let per_expert = moe.gate_proj.expert_bytes() + moe.up_proj.expert_bytes() + moe.down_proj.expert_bytes();
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

    /// The routed experts (+ shared expert) of one layer, added into the
    /// residual stream `sc.x`, reading the normed input `sc.h`.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        ctx: &GpuContext,
        enc: &mut GpuEncoder,
        moe: &GpuMoe,
        sc: &Scratch,
        t: usize,
        l: usize,
        policy: Resolved,
    ) -> Result<()> {
        let mc = self
            .config
            .moe
            .as_ref()
            .ok_or_else(|| Error::Gpu("MoE layer without an MoE config".into()))?;
        let ms = sc
            .moe
            .as_ref()
            .ok_or_else(|| Error::Gpu("MoE scratch missing".into()))?;
        let k = mc.top_k;
        let (h, x) = (&sc.h, &sc.x);
        moe.router.forward(ctx, enc, h, &ms.routing.logits)?;
        let renormalize = mc.routing.renormalize || !mc.routing.softmax_then_topk;
        route_topk(ctx, enc, &ms.routing, renormalize)?;
        // A batch-aware policy rewrites the routing buffer in place.
        if let Some(log) = &sc.policy_log {
            let rec = log.shape[1];
            apply_policy(ctx, enc, policy, &ms.routing, renormalize, &ms.policy, log, l * rec)?;
        }
        // The routing buffer (ms.routing.ids / weights) is final from here on.
        group_by_expert(ctx, enc, &ms.routing, &ms.grouping)?;
        let g = &ms.grouping;
        if let Some(log) = &sc.expert_offsets {
            let row = g.offsets.data_bytes();
            enc.inner()
                .copy_buffer_to_buffer(&g.offsets.buffer, 0, &log.buffer, l as u64 * row, row);
        }
        moe_matmul(ctx, enc, &moe.gate_proj, h, MoeInput::Tokens, g, t, k, &ms.gy)?;
        moe_matmul(ctx, enc, &moe.up_proj, h, MoeInput::Tokens, g, t, k, &ms.uy)?;
        silu_mul(ctx, enc, &ms.gy, &ms.uy, &ms.act)?;
        moe_matmul(ctx, enc, &moe.down_proj, &ms.act, MoeInput::Grouped, g, t, k, &ms.dy)?;
        match (&moe.shared, &ms.shared_gate) {
            (Some((mlp, gate)), Some(sg)) => {
                let bufs = sc.mlp_for(mlp)?;
                mlp.forward(ctx, enc, h, bufs)?;
                gate.forward(ctx, enc, h, sg)?;
                moe_combine(ctx, enc, x, &ms.dy, g, Some((&bufs[3], sg)))
            }
            _ => moe_combine(ctx, enc, x, &ms.dy, g, None),
        }
    }

    /// Makes sure `need` free pages exist, growing the pool (and copying the
    /// cached keys and values) if not; shrinks an idle, grown pool first.
    fn reserve_pages(&self, need: usize) -> Result<()> {
        let mut a = self
            .alloc
            .lock()
            .map_err(|_| Error::Gpu("KV page allocator lock poisoned".into()))?;
        let mut kv = self.kv.lock().map_err(|_| Error::Gpu("KV pool lock poisoned".into()))?;
        if a.free.len() == a.capacity && a.capacity > INITIAL_PAGES && need <= INITIAL_PAGES {
            // No sequence holds pages: give the grown pool's memory back.
            *kv = Self::new_pool(&self.ctx, &self.config, INITIAL_PAGES)?;
            a.capacity = INITIAL_PAGES;
            a.free = (0..INITIAL_PAGES as u32).rev().collect();
        }
        if a.free.len() >= need {
            return Ok(());
        }
        let in_use = a.capacity - a.free.len();
        let new_cap = (a.capacity * 2).max(in_use + need);
        let new = Self::new_pool(&self.ctx, &self.config, new_cap)?;
        let mut enc = self.ctx.encoder("grow KV cache");
        for ((ok, ov), (nk, nv)) in kv.layers.iter().zip(&new.layers) {
            enc.inner()
                .copy_buffer_to_buffer(&ok.buffer, 0, &nk.buffer, 0, ok.data_bytes());
            enc.inner()
                .copy_buffer_to_buffer(&ov.buffer, 0, &nv.buffer, 0, ov.data_bytes());
        }
        self.ctx.submit(enc)?;
        let old_cap = a.capacity;
        a.free.extend((old_cap as u32..new_cap as u32).rev());
        a.capacity = new_cap;
        *kv = new;
        Ok(())
    }
}
