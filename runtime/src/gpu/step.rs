//! What one step of the GPU engine (one pass through the layers for at
//! most `max_step_tokens` tokens) works on: its inputs ([`StepInputs`]:
//! token ids, positions, KV destinations, page table) and its activations
//! ([`Scratch`], grow-only buffers seen at the step's token count).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::attention::AttentionShape;
use crate::gpu::context::{GpuContext, GpuTensor};
use crate::gpu::kv_cache::{GpuSequence, KV_PAGE};
use crate::gpu::layer::{GpuFfn, GpuLayer};
use crate::gpu::moe::{Grouping, Routing};
use crate::gpu::selection::{PolicyBuffers, log_record_len};

/// One sequence's share of a step: its index in the step's sequences, the
/// tokens it has cached before the step, and its new tokens.
pub(crate) struct Piece<'a> {
    pub seq: usize,
    pub cached: usize,
    pub tokens: &'a [u32],
}

/// The per-token inputs of a step of T tokens, on the GPU.
pub(crate) struct StepInputs {
    /// T.
    pub t: usize,
    /// (T) u32 token ids.
    pub ids: GpuTensor,
    /// (T) u32 positions.
    pub pos: GpuTensor,
    /// (T, 2) u32: each token's (sequence in the step, position).
    pub tok: GpuTensor,
    /// (T) u32: the KV-cache row each token's key and value go to.
    pub dest: GpuTensor,
    /// (sequences, max pages) u32: each sequence's page table.
    pub pages: GpuTensor,
    pub shape: AttentionShape,
}

impl StepInputs {
    /// The inputs of `pieces`, whose sequences (`seqs[piece.seq]`) already
    /// hold the pages their new tokens need.
    pub(crate) fn new(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        seqs: &[&mut GpuSequence],
        pieces: &[Piece<'_>],
    ) -> Result<StepInputs> {
        let t: usize = pieces.iter().map(|p| p.tokens.len()).sum();
        let max_pages = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut tok = Vec::with_capacity(2 * t);
        let mut dest = Vec::with_capacity(t);
        let mut max_keys = 0;
        for piece in pieces {
            let s = &seqs[piece.seq];
            for (j, &id) in piece.tokens.iter().enumerate() {
                let p = piece.cached + j;
                ids.push(id);
                pos.push(p as u32);
                tok.extend([piece.seq as u32, p as u32]);
                dest.push(s.pages[p / KV_PAGE] * KV_PAGE as u32 + (p % KV_PAGE) as u32);
                let first = cfg.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
                max_keys = max_keys.max(p + 1 - first);
            }
        }
        let mut table = vec![0u32; seqs.len() * max_pages];
        for (i, s) in seqs.iter().enumerate() {
            table[i * max_pages..i * max_pages + s.pages.len()].copy_from_slice(&s.pages);
        }
        Ok(StepInputs {
            t,
            ids: ctx.upload_u32("step token ids", &ids, &[t])?,
            pos: ctx.upload_u32("step positions", &pos, &[t])?,
            tok: ctx.upload_u32("step (sequence, position)", &tok, &[t, 2])?,
            dest: ctx.upload_u32("step cache rows", &dest, &[t])?,
            pages: ctx.upload_u32("step page table", &table, &[seqs.len(), max_pages])?,
            shape: AttentionShape {
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                page: KV_PAGE,
                max_pages,
                max_keys,
                sliding_window: cfg.sliding_window,
            },
        })
    }
}

/// The activations of one step of T tokens, reused by every layer (the
/// kernels of a step run in order, each pass seeing the previous one's
/// writes). The engine keeps one set of buffers for the most tokens a step
/// has needed so far and grows it only when a step needs more; a step sees
/// them through [`Scratch::view`] at its own T, so a prefill chunk and the
/// decode steps after it share the buffers instead of reallocating them.
pub(crate) struct Scratch {
    /// T (the capacity, for the stored buffers).
    pub tokens: usize,
    /// (T, C) the residual stream.
    pub x: GpuTensor,
    /// (T, C) the normed input of attention or the feed-forward part.
    pub h: GpuTensor,
    /// (T, H * D) queries, and after q norm.
    pub q: GpuTensor,
    pub qn: GpuTensor,
    /// (T, Hkv * D) keys, after k norm, and values.
    pub k: GpuTensor,
    pub kn: GpuTensor,
    pub v: GpuTensor,
    /// (T, H * D) attention output.
    pub att: GpuTensor,
    /// (T, C) o_proj output.
    pub o: GpuTensor,
    /// Dense MLPs (and shared experts), per intermediate size I: gate, up,
    /// act (T, I) and the output (T, C).
    pub mlp: Vec<(usize, [GpuTensor; 4])>,
    pub moe: Option<MoeScratch>,
    /// (L, E + 1) u32: each MoE layer's expert offsets of this step, copied
    /// from the grouping after the layer ran (rows of dense layers stay 0).
    pub expert_offsets: Option<GpuTensor>,
    /// (L, 1 + 2 * T * K) u32: the selection policy's log per layer (see
    /// `gpu::selection`).
    pub policy_log: Option<GpuTensor>,
}

pub(crate) struct MoeScratch {
    pub routing: Routing,
    pub grouping: Grouping,
    pub policy: PolicyBuffers,
    /// (T * K, I) grouped expert activations: gate, up, act; (T * K, C) down.
    pub gy: GpuTensor,
    pub uy: GpuTensor,
    pub act: GpuTensor,
    pub dy: GpuTensor,
    /// The shared expert's gate logit (T, 1); its output goes to the MLP scratch.
    pub shared_gate: Option<GpuTensor>,
}

impl Scratch {
    /// Buffers for steps of up to `t` tokens of a model with `layers`.
    pub(crate) fn new(ctx: &GpuContext, cfg: &ModelConfig, layers: &[GpuLayer], t: usize) -> Result<Scratch> {
        let (c, h, hkv, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let f = |label: &str, shape: &[usize]| ctx.zeros_f32(label, shape);
        // Intermediate sizes of the dense MLPs: dense layers and shared experts.
        let mut dense_sizes = Vec::new();
        let mut moe_dims = None;
        for l in layers {
            match &l.ffn {
                GpuFfn::Dense(m) => dense_sizes.push(m.intermediate()),
                GpuFfn::Moe(m) => {
                    if let Some((s, _)) = &m.shared {
                        dense_sizes.push(s.intermediate());
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
        let (moe, expert_offsets, policy_log) = match (moe_dims, &cfg.moe) {
            (Some((e, i, shared)), Some(mc)) => {
                let k = mc.top_k;
                let moe = MoeScratch {
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
                };
                let offsets = ctx.zeros_u32("per-layer expert offsets", &[cfg.num_layers, e + 1])?;
                let log = ctx.zeros_u32("per-layer policy log", &[cfg.num_layers, log_record_len(t, k)])?;
                (Some(moe), Some(offsets), Some(log))
            }
            _ => (None, None, None),
        };
        Ok(Scratch {
            tokens: t,
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

    /// The same buffers seen as a step of `t` (at most [`Scratch::tokens`])
    /// tokens, with top-K `k`.
    pub(crate) fn view(&self, t: usize, k: usize) -> Result<Scratch> {
        if t > self.tokens {
            return Err(Error::Gpu(format!(
                "a step of {t} tokens does not fit scratch for {}",
                self.tokens
            )));
        }
        let mlp = self
            .mlp
            .iter()
            .map(|(i, [g, u, a, o])| Ok((*i, [g.rows(t)?, u.rows(t)?, a.rows(t)?, o.rows(t)?])))
            .collect::<Result<Vec<_>>>()?;
        let moe = match &self.moe {
            Some(m) => Some(MoeScratch {
                routing: Routing {
                    logits: m.routing.logits.rows(t)?,
                    ids: m.routing.ids.rows(t)?,
                    weights: m.routing.weights.rows(t)?,
                },
                grouping: Grouping {
                    offsets: m.grouping.offsets.clone(),
                    list: m.grouping.list.rows(t * k)?,
                    order: m.grouping.order.rows(t)?,
                    order_w: m.grouping.order_w.rows(t)?,
                    active: m.grouping.active.clone(),
                },
                // E values each: the same whatever T.
                policy: m.policy.clone(),
                gy: m.gy.rows(t * k)?,
                uy: m.uy.rows(t * k)?,
                act: m.act.rows(t * k)?,
                dy: m.dy.rows(t * k)?,
                shared_gate: m.shared_gate.as_ref().map(|g| g.rows(t)).transpose()?,
            }),
            None => None,
        };
        let policy_log = match &self.policy_log {
            Some(log) => Some(log.view(&[log.shape[0], log_record_len(t, k)])?),
            None => None,
        };
        Ok(Scratch {
            tokens: t,
            x: self.x.rows(t)?,
            h: self.h.rows(t)?,
            q: self.q.rows(t)?,
            qn: self.qn.rows(t)?,
            k: self.k.rows(t)?,
            kn: self.kn.rows(t)?,
            v: self.v.rows(t)?,
            att: self.att.rows(t)?,
            o: self.o.rows(t)?,
            mlp,
            moe,
            expert_offsets: self.expert_offsets.clone(),
            policy_log,
        })
    }

    /// The MLP scratch for intermediate size `i`.
    pub(crate) fn mlp_for(&self, i: usize) -> Result<&[GpuTensor; 4]> {
        self.mlp
            .iter()
            .find(|(n, _)| *n == i)
            .map(|(_, b)| b)
            .ok_or_else(|| Error::Gpu(format!("no MLP scratch of intermediate size {i}")))
    }
}
