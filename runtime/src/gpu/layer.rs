//! The GPU engine's layers, one type per part of `model.rs` and in the
//! same order: [`GpuLayer`] (norms and residual adds), [`GpuAttention`]
//! (projections, q/k norm, RoPE, the KV cache, attention), and the
//! feed-forward part, a dense [`GpuMlp`] or a [`GpuMoe`] (router, the
//! routing buffer a selection policy rewrites, grouped experts, shared
//! expert). Each `forward` records its kernels for one step into an
//! encoder, reading and writing the step's [`Scratch`].

use crate::config::{ModelConfig, QkNorm};
use crate::error::{Error, Result};
use crate::gpu::attention::{attention, clamp, kv_append};
use crate::gpu::context::{Elem, GpuContext, GpuEncoder, GpuTensor};
use crate::gpu::kernels::{add, matmul_nt, rms_norm_rows, rope_heads, silu_mul};
use crate::gpu::moe::{GpuExperts, MoeInput, group_by_expert, moe_combine, moe_matmul, route_topk};
use crate::gpu::selection::apply_policy;
use crate::gpu::step::{Scratch, StepInputs};
use crate::gpu::upload::{Convert, Part, WeightUpload};
use crate::gpu::weights::GpuMatrix;
use crate::linear::QLinear;
use crate::model::{Attention, Ffn, Layer, Mlp, Moe};
use crate::selection::Resolved;
use crate::tensor::{DType, WeightVec};

/// What every layer's forward pass of one step shares.
pub(crate) struct StepCtx<'a> {
    pub ctx: &'a GpuContext,
    pub cfg: &'a ModelConfig,
    /// The step's activations, sized for its tokens.
    pub sc: &'a Scratch,
    pub inputs: &'a StepInputs,
    /// The selection policy of this step's MoE layers (`Exact` outside decode).
    pub policy: Resolved,
}

/// A linear layer on the GPU: weight in its stored format, optional f32 bias.
#[derive(Debug)]
pub(crate) struct GpuLinear {
    pub w: GpuMatrix,
    pub bias: Option<GpuTensor>,
}

impl GpuLinear {
    pub(crate) fn create(ctx: &GpuContext, up: &mut WeightUpload, l: &QLinear) -> Result<GpuLinear> {
        let w = GpuMatrix::create(ctx, &l.weight, up, ctx.max_binding_bytes())?;
        let bias = match &l.bias {
            Some(b) => Some(vec_tensor(ctx, up, &format!("{} bias", l.weight.name), b)?),
            None => None,
        };
        Ok(GpuLinear { w, bias })
    }

    /// `y = x · Wᵀ (+ b)`.
    pub(crate) fn forward(&self, ctx: &GpuContext, enc: &mut GpuEncoder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        matmul_nt(ctx, enc, x, &self.w, self.bias.as_ref(), y)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.w.data_bytes()
    }
}

#[derive(Debug)]
pub(crate) struct GpuMlp {
    pub gate_proj: GpuLinear,
    pub up_proj: GpuLinear,
    pub down_proj: GpuLinear,
}

impl GpuMlp {
    fn create(ctx: &GpuContext, up: &mut WeightUpload, m: &Mlp) -> Result<GpuMlp> {
        Ok(GpuMlp {
            gate_proj: GpuLinear::create(ctx, up, &m.gate_proj)?,
            up_proj: GpuLinear::create(ctx, up, &m.up_proj)?,
            down_proj: GpuLinear::create(ctx, up, &m.down_proj)?,
        })
    }

    /// The intermediate size I.
    pub(crate) fn intermediate(&self) -> usize {
        self.gate_proj.w.rows
    }

    /// `bufs[3] = down(silu(gate(h)) * up(h))` for h (T, C), with `bufs` =
    /// gate, up, act scratch (T, I) and the output (T, C).
    pub(crate) fn forward(
        &self,
        ctx: &GpuContext,
        enc: &mut GpuEncoder,
        h: &GpuTensor,
        bufs: &[GpuTensor; 4],
    ) -> Result<()> {
        let [g, u, a, out] = bufs;
        self.gate_proj.forward(ctx, enc, h, g)?;
        self.up_proj.forward(ctx, enc, h, u)?;
        silu_mul(ctx, enc, g, u, a)?;
        self.down_proj.forward(ctx, enc, a, out)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.gate_proj.bytes() + self.up_proj.bytes() + self.down_proj.bytes()
    }
}

/// Self-attention: `model::Attention` on the GPU.
#[derive(Debug)]
pub(crate) struct GpuAttention {
    q_proj: GpuLinear,
    k_proj: GpuLinear,
    v_proj: GpuLinear,
    o_proj: GpuLinear,
    q_norm: Option<GpuTensor>,
    k_norm: Option<GpuTensor>,
}

impl GpuAttention {
    fn create(ctx: &GpuContext, up: &mut WeightUpload, l: usize, a: &Attention) -> Result<GpuAttention> {
        let norm = |up: &mut WeightUpload, name: &str, w: &Option<WeightVec>| {
            w.as_ref()
                .map(|w| vec_tensor(ctx, up, &format!("layers.{l}.{name}"), w))
                .transpose()
        };
        Ok(GpuAttention {
            q_proj: GpuLinear::create(ctx, up, &a.q_proj)?,
            k_proj: GpuLinear::create(ctx, up, &a.k_proj)?,
            v_proj: GpuLinear::create(ctx, up, &a.v_proj)?,
            o_proj: GpuLinear::create(ctx, up, &a.o_proj)?,
            q_norm: norm(up, "q_norm", &a.q_norm)?,
            k_norm: norm(up, "k_norm", &a.k_norm)?,
        })
    }

    /// `sc.o = o_proj(attention(rope(q), cache))` for the normed input
    /// `sc.h`, appending this step's keys and values to the layer's cache
    /// (`kv`: its key and value pools).
    fn forward(&self, s: &StepCtx<'_>, enc: &mut GpuEncoder, kv: &(GpuTensor, GpuTensor)) -> Result<()> {
        let (ctx, cfg, sc, inputs) = (s.ctx, s.cfg, s.sc, s.inputs);
        let (h, hkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        self.q_proj.forward(ctx, enc, &sc.h, &sc.q)?;
        self.k_proj.forward(ctx, enc, &sc.h, &sc.k)?;
        self.v_proj.forward(ctx, enc, &sc.h, &sc.v)?;
        // q/k norm: over the whole vector (OLMoE) or each head (Qwen3).
        let norm_len = |heads: usize| {
            if cfg.qk_norm == QkNorm::PerHead { d } else { heads * d }
        };
        let mut q = &sc.q;
        let mut k = &sc.k;
        if let Some(w) = &self.q_norm {
            rms_norm_rows(ctx, enc, q, w, &sc.qn, norm_len(h), cfg.rms_norm_eps)?;
            q = &sc.qn;
        }
        if let Some(w) = &self.k_norm {
            rms_norm_rows(ctx, enc, k, w, &sc.kn, norm_len(hkv), cfg.rms_norm_eps)?;
            k = &sc.kn;
        }
        if let Some(limit) = cfg.clip_qkv {
            for x in [q, k, &sc.v] {
                clamp(ctx, enc, x, limit)?;
            }
        }
        rope_heads(ctx, enc, q, &inputs.pos, h, d, cfg.rope_theta, cfg.rope_style)?;
        rope_heads(ctx, enc, k, &inputs.pos, hkv, d, cfg.rope_theta, cfg.rope_style)?;
        let (kc, vc) = kv;
        kv_append(ctx, enc, k, &sc.v, &inputs.dest, kc, vc)?;
        attention(ctx, enc, &inputs.shape, q, kc, vc, &inputs.tok, &inputs.pages, &sc.att)?;
        self.o_proj.forward(ctx, enc, &sc.att, &sc.o)
    }

    fn bytes(&self) -> u64 {
        self.q_proj.bytes() + self.k_proj.bytes() + self.v_proj.bytes() + self.o_proj.bytes()
    }
}

/// A sparse MoE block: `model::Moe` on the GPU.
#[derive(Debug)]
pub(crate) struct GpuMoe {
    /// Router (E, C), kept in f32 by the exporters.
    router: GpuLinear,
    pub gate_proj: GpuExperts,
    pub up_proj: GpuExperts,
    pub down_proj: GpuExperts,
    pub shared: Option<(GpuMlp, GpuLinear)>,
}

impl GpuMoe {
    fn create(ctx: &GpuContext, up: &mut WeightUpload, l: usize, moe: &Moe) -> Result<GpuMoe> {
        if moe
            .experts
            .iter()
            .any(|e| e.gate_proj.bias.is_some() || e.down_proj.bias.is_some())
        {
            return Err(Error::Gpu(format!(
                "layer {l}: expert biases are not supported on the GPU"
            )));
        }
        let pick = |f: fn(&Mlp) -> &QLinear| moe.experts.iter().map(|e| &f(e).weight).collect::<Vec<_>>();
        let experts = |up: &mut WeightUpload, name: &str, f: fn(&Mlp) -> &QLinear| {
            GpuExperts::create(ctx, &format!("layers.{l}.experts.{name}"), &pick(f), up)
        };
        let shared = match &moe.shared_expert {
            Some((m, g)) => Some((GpuMlp::create(ctx, up, m)?, GpuLinear::create(ctx, up, g)?)),
            None => None,
        };
        Ok(GpuMoe {
            router: GpuLinear::create(ctx, up, &moe.gate)?,
            gate_proj: experts(up, "gate_proj", |m| &m.gate_proj)?,
            up_proj: experts(up, "up_proj", |m| &m.up_proj)?,
            down_proj: experts(up, "down_proj", |m| &m.down_proj)?,
            shared,
        })
    }

    /// The routed experts (+ shared expert) of layer `l`, added into the
    /// residual stream `sc.x`, reading the normed input `sc.h`.
    fn forward(&self, s: &StepCtx<'_>, enc: &mut GpuEncoder, l: usize) -> Result<()> {
        let (ctx, sc, t) = (s.ctx, s.sc, s.inputs.t);
        let mc = s
            .cfg
            .moe
            .as_ref()
            .ok_or_else(|| Error::Gpu("MoE layer without an MoE config".into()))?;
        let ms = sc
            .moe
            .as_ref()
            .ok_or_else(|| Error::Gpu("MoE scratch missing".into()))?;
        let k = mc.top_k;
        let (h, x) = (&sc.h, &sc.x);
        self.router.forward(ctx, enc, h, &ms.routing.logits)?;
        let renormalize = mc.routing.renormalize || !mc.routing.softmax_then_topk;
        route_topk(ctx, enc, &ms.routing, renormalize)?;
        // A batch-aware policy rewrites the routing buffer in place.
        if let Some(log) = &sc.policy_log {
            let rec = log.shape[1];
            apply_policy(ctx, enc, s.policy, &ms.routing, renormalize, &ms.policy, log, l * rec)?;
        }
        // The routing buffer (ms.routing.ids / weights) is final from here on.
        group_by_expert(ctx, enc, &ms.routing, &ms.grouping)?;
        let g = &ms.grouping;
        if let Some(log) = &sc.expert_offsets {
            let row = g.offsets.data_bytes();
            enc.inner()
                .copy_buffer_to_buffer(&g.offsets.buffer, 0, &log.buffer, l as u64 * row, row);
        }
        moe_matmul(ctx, enc, &self.gate_proj, h, MoeInput::Tokens, g, t, k, &ms.gy)?;
        moe_matmul(ctx, enc, &self.up_proj, h, MoeInput::Tokens, g, t, k, &ms.uy)?;
        silu_mul(ctx, enc, &ms.gy, &ms.uy, &ms.act)?;
        moe_matmul(ctx, enc, &self.down_proj, &ms.act, MoeInput::Grouped, g, t, k, &ms.dy)?;
        match (&self.shared, &ms.shared_gate) {
            (Some((mlp, gate)), Some(sg)) => {
                let bufs = sc.mlp_for(mlp.intermediate())?;
                mlp.forward(ctx, enc, h, bufs)?;
                gate.forward(ctx, enc, h, sg)?;
                moe_combine(ctx, enc, x, &ms.dy, g, Some((&bufs[3], sg)))
            }
            _ => moe_combine(ctx, enc, x, &ms.dy, g, None),
        }
    }

    /// Bytes of one expert's three matrices: what a step reads per active expert.
    pub(crate) fn expert_bytes(&self) -> u64 {
        self.gate_proj.expert_bytes() + self.up_proj.expert_bytes() + self.down_proj.expert_bytes()
    }

    /// Bytes every step reads whatever the routing: router and shared expert.
    fn dense_bytes(&self) -> u64 {
        self.router.bytes() + self.shared.as_ref().map_or(0, |(s, g)| s.bytes() + g.bytes())
    }
}

#[derive(Debug)]
pub(crate) enum GpuFfn {
    Dense(GpuMlp),
    Moe(GpuMoe),
}

/// One decoder layer: `model::Layer` on the GPU.
#[derive(Debug)]
pub(crate) struct GpuLayer {
    input_layernorm: GpuTensor,
    self_attn: GpuAttention,
    post_attention_layernorm: GpuTensor,
    pub ffn: GpuFfn,
}

impl GpuLayer {
    pub(crate) fn create(ctx: &GpuContext, up: &mut WeightUpload, l: usize, layer: &Layer) -> Result<GpuLayer> {
        Ok(GpuLayer {
            input_layernorm: vec_tensor(ctx, up, &format!("layers.{l}.input_layernorm"), &layer.input_layernorm)?,
            self_attn: GpuAttention::create(ctx, up, l, &layer.self_attn)?,
            post_attention_layernorm: vec_tensor(
                ctx,
                up,
                &format!("layers.{l}.post_attention_layernorm"),
                &layer.post_attention_layernorm,
            )?,
            ffn: match &layer.ffn {
                Ffn::Dense(m) => GpuFfn::Dense(GpuMlp::create(ctx, up, m)?),
                Ffn::Moe(moe) => GpuFfn::Moe(GpuMoe::create(ctx, up, l, moe)?),
            },
        })
    }

    /// Layer `l` on the residual stream `sc.x`, in place:
    /// `x += attn(norm(x)); x += ffn(norm(x))`.
    pub(crate) fn forward(
        &self,
        s: &StepCtx<'_>,
        enc: &mut GpuEncoder,
        l: usize,
        kv: &(GpuTensor, GpuTensor),
    ) -> Result<()> {
        let (ctx, cfg, sc) = (s.ctx, s.cfg, s.sc);
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        rms_norm_rows(ctx, enc, &sc.x, &self.input_layernorm, &sc.h, c, eps)?;
        self.self_attn.forward(s, enc, kv)?;
        add(ctx, enc, &sc.x, &sc.o)?;
        rms_norm_rows(ctx, enc, &sc.x, &self.post_attention_layernorm, &sc.h, c, eps)?;
        match &self.ffn {
            GpuFfn::Dense(mlp) => {
                let bufs = sc.mlp_for(mlp.intermediate())?;
                mlp.forward(ctx, enc, &sc.h, bufs)?;
                add(ctx, enc, &sc.x, &bufs[3])
            }
            GpuFfn::Moe(moe) => moe.forward(s, enc, l),
        }
    }

    /// Bytes of this layer's weights on the GPU.
    pub(crate) fn weight_bytes(&self) -> u64 {
        self.self_attn.bytes()
            + match &self.ffn {
                GpuFfn::Dense(m) => m.bytes(),
                GpuFfn::Moe(m) => m.dense_bytes() + m.expert_bytes() * m.gate_proj.experts as u64,
            }
    }

    /// Bytes a decode step reads from this layer whatever the routing:
    /// attention, a dense MLP, or an MoE block's router and shared expert.
    pub(crate) fn dense_bytes(&self) -> u64 {
        self.self_attn.bytes()
            + match &self.ffn {
                GpuFfn::Dense(m) => m.bytes(),
                GpuFfn::Moe(m) => m.dense_bytes(),
            }
    }
}

/// A weight vector (norm, bias) as an f32 tensor, written from its stored
/// tensor like every other weight (so it can be streamed too).
pub(crate) fn vec_tensor(ctx: &GpuContext, up: &mut WeightUpload, label: &str, v: &WeightVec) -> Result<GpuTensor> {
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
