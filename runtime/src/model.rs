//! The CPU reference forward pass: plain, readable f32 Rust, batched over
//! sequences of different lengths, with a KV cache per sequence.
//!
//! All five supported architectures are the same pre-norm decoder:
//!
//! ```text
//! x = embed_tokens[ids]
//! for each layer:
//!     x = x + o_proj(attention(rope(qk_norm(q_proj(rms(x)))), rope(qk_norm(k_proj(rms(x)))), v_proj(rms(x))))
//!     x = x + ffn(rms(x))         # dense SwiGLU MLP, or routed experts (+ shared expert)
//! logits = lm_head(rms(x))
//! ```
//!
//! Their differences are data in [`ModelConfig`] (q/k norm, qkv bias, rope
//! pairing, routing order and renormalisation, shared expert, dense layers);
//! `arch/` maps each checkpoint's config spelling and tensor names onto it.
//! This is the oracle that every GPU kernel is checked against, so clarity
//! wins over speed; only the matrix products are parallel.

use rayon::prelude::*;

use crate::config::{ModelConfig, RopeStyle, Routing};
use crate::error::{Error, Result};
use crate::generate::{StepOutput, StepSpec, check_batch};
use crate::linear::{QLinear, dot};
use crate::selection::{Resolved, select_cpu};
use crate::tensor::{DType, QTensor, WeightVec, quantize};

/// SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: QLinear,
    pub up_proj: QLinear,
    pub down_proj: QLinear,
}

#[derive(Debug)]
pub struct Moe {
    /// Router: (E, C).
    pub gate: QLinear,
    pub experts: Vec<Mlp>,
    /// Qwen2-MoE's shared expert and its scalar gate, (1, C).
    pub shared_expert: Option<(Mlp, QLinear)>,
}

// Layers are few and long-lived, so the size difference between the
// variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: QLinear,
    pub k_proj: QLinear,
    pub v_proj: QLinear,
    pub o_proj: QLinear,
    pub q_norm: Option<WeightVec>,
    pub k_norm: Option<WeightVec>,
}

#[derive(Debug)]
pub struct Layer {
    pub input_layernorm: WeightVec,
    pub self_attn: Attention,
    pub post_attention_layernorm: WeightVec,
    pub ffn: Ffn,
}

pub struct Model {
    pub config: ModelConfig,
    /// (V, C).
    pub embed_tokens: QTensor,
    pub layers: Vec<Layer>,
    pub norm: WeightVec,
    /// (V, C); the embedding matrix itself when embeddings are tied.
    pub lm_head: QLinear,
}

/// Per-sequence state: the KV cache and the number of positions consumed.
/// The cache grows as tokens arrive and is freed when the sequence drops.
pub struct Sequence {
    len: usize,
    /// Per layer: keys and values, each (len, H_kv * D).
    kv: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Sequence {
    /// Number of tokens already in this sequence's KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions' logits `forward` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new token of each sequence: `V` values per sequence.
    Last,
    /// Every new token: `T_i * V` values per sequence, row-major.
    All,
}

impl Model {
    /// Whether the weights are in memory. A model built over a streamed
    /// GGUF (see `gpu::GgufStreamLoad`) is only a description of its tensors
    /// for the GPU upload; its weights all come from one stream, so the
    /// embedding speaks for every tensor.
    pub fn is_resident(&self) -> bool {
        self.embed_tokens.is_resident()
    }

    /// A fresh sequence with an empty KV cache.
    pub fn new_sequence(&self) -> Sequence {
        Sequence {
            len: 0,
            kv: vec![(Vec::new(), Vec::new()); self.config.num_layers],
        }
    }

    /// Runs the new tokens of several sequences (of any lengths) through the
    /// model as one batch, appending them to each sequence's KV cache.
    /// Returns one logits vector per sequence, as selected by `logits`.
    /// All inputs are validated before any cache is touched, so an error
    /// leaves every sequence as it was.
    ///
    /// Routing is exact; [`Model::run`] runs a decode step under a
    /// selection policy.
    pub fn forward(&self, batch: &mut [(&mut Sequence, &[u32])], logits: Logits) -> Result<Vec<Vec<f32>>> {
        self.check(batch)?;
        self.forward_checked(batch, logits, Resolved::Exact)
    }

    /// One forward call as [`crate::generate::Engine::run`] describes it:
    /// in a decode step the batch's routing goes through the policy's
    /// oracle ([`select_cpu`]) before the experts run, as the GPU engine's
    /// selection kernels do, so a whole forward pass under any policy has a
    /// reference. The CPU reports no step metrics.
    pub fn run(&self, batch: &mut [(&mut Sequence, &[u32])], spec: StepSpec) -> Result<StepOutput> {
        self.check(batch)?;
        let policy = spec.routing(&self.config, batch.iter().map(|(s, t)| (s.len, t.len())))?;
        Ok(StepOutput {
            logits: self.forward_checked(batch, spec.logits, policy)?,
            metrics: Vec::new(),
        })
    }

    /// The weights are in memory and the batch is valid for this model.
    fn check(&self, batch: &[(&mut Sequence, &[u32])]) -> Result<()> {
        if !self.is_resident() {
            return Err(Error::InvalidArgument(
                "forward: this model's weights were streamed to the GPU and are not in memory; \
                 the CPU forward pass needs a model loaded into memory"
                    .into(),
            ));
        }
        let layers = self.config.num_layers;
        check_batch(
            &self.config,
            batch.iter().map(|(s, t)| (s.len, s.kv.len() == layers, *t)),
        )
    }

    /// The forward pass of a batch that [`Model::check`] accepted, routing
    /// its MoE layers with `policy`.
    fn forward_checked(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        logits: Logits,
        policy: Resolved,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        // x: (N, C) holds every new token of every sequence, sequence by sequence.
        let c = cfg.hidden_size;
        let n: usize = batch.iter().map(|(_, t)| t.len()).sum();
        let mut x = vec![0f32; n * c];
        for (row, &id) in x.chunks_mut(c).zip(batch.iter().flat_map(|(_, t)| t.iter())) {
            self.embed_tokens.dequantize_row(id as usize, row);
        }

        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_layernorm, cfg.rms_norm_eps);
            let attn = self.attention(l, &layer.self_attn, &h, batch);
            add_assign(&mut x, &attn);
            let h = rms_norm(&x, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let ffn = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&h, n),
                Ffn::Moe(moe) => self.moe(moe, &h, n, policy),
            };
            add_assign(&mut x, &ffn);
        }
        for (seq, tokens) in batch.iter_mut() {
            seq.len += tokens.len();
        }

        // Only the rows whose logits are wanted go through the norm and head.
        let mut rows = Vec::new();
        let mut start = 0;
        for (_, tokens) in batch.iter() {
            let span = start..start + tokens.len();
            match logits {
                Logits::Last => rows.push(span.end - 1),
                Logits::All => rows.extend(span),
            }
            start += tokens.len();
        }
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * c..(r + 1) * c].iter().copied())
            .collect();
        let h = rms_norm(&picked, &self.norm, cfg.rms_norm_eps);
        let all = self.lm_head.forward(&h, rows.len());
        let v = cfg.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for (_, tokens) in batch.iter() {
            let k = if logits == Logits::Last { 1 } else { tokens.len() };
            out.push(all[at * v..(at + k) * v].to_vec());
            at += k;
        }
        Ok(out)
    }

    /// Self-attention for every new token of every sequence; returns
    /// `o_proj(attn)` as (N, C).
    fn attention(&self, l: usize, a: &Attention, h: &[f32], batch: &mut [(&mut Sequence, &[u32])]) -> Vec<f32> {
        let cfg = &self.config;
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n = h.len() / cfg.hidden_size;
        let mut q = a.q_proj.forward(h, n);
        let mut k = a.k_proj.forward(h, n);
        let mut v = a.v_proj.forward(h, n);
        // q/k norm: OLMoE normalises all H*D values at once (`q_norm` has
        // H*D weights), Qwen3 each head's D values (`q_norm` has D weights);
        // `rms_norm` works on rows as long as its weight, so one call does both.
        if let Some(w) = &a.q_norm {
            q = rms_norm(&q, w, cfg.rms_norm_eps);
        }
        if let Some(w) = &a.k_norm {
            k = rms_norm(&k, w, cfg.rms_norm_eps);
        }
        if let Some(clip) = cfg.clip_qkv {
            for t in [&mut q, &mut k, &mut v] {
                t.iter_mut().for_each(|x| *x = x.clamp(-clip, clip));
            }
        }

        let scale = 1.0 / (d as f32).sqrt();
        let group = nh / nkv;
        let mut out = vec![0f32; n * nh * d];
        let mut start = 0;
        for (seq, tokens) in batch.iter_mut() {
            let t = tokens.len();
            let base = seq.len;
            for i in 0..t {
                let pos = base + i;
                let row = start + i;
                for hh in 0..nh {
                    rope(
                        &mut q[(row * nh + hh) * d..(row * nh + hh + 1) * d],
                        pos,
                        cfg.rope_theta,
                        cfg.rope_style,
                    );
                }
                for hh in 0..nkv {
                    rope(
                        &mut k[(row * nkv + hh) * d..(row * nkv + hh + 1) * d],
                        pos,
                        cfg.rope_theta,
                        cfg.rope_style,
                    );
                }
            }
            let (kc, vc) = &mut seq.kv[l];
            kc.extend_from_slice(&k[start * nkv * d..(start + t) * nkv * d]);
            vc.extend_from_slice(&v[start * nkv * d..(start + t) * nkv * d]);
            let (kc, vc) = (&*kc, &*vc);
            let q = &q;
            out[start * nh * d..(start + t) * nh * d]
                .par_chunks_mut(nh * d)
                .enumerate()
                .for_each(|(i, o)| {
                    let pos = base + i;
                    // Causal mask, narrowed by the sliding window if any:
                    // key j is visible when pos - j < window.
                    let first = cfg.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let mut scores = vec![0f32; pos + 1 - first];
                    for hh in 0..nh {
                        let kvh = hh / group;
                        let qh = &q[((start + i) * nh + hh) * d..((start + i) * nh + hh + 1) * d];
                        for (s, j) in scores.iter_mut().zip(first..=pos) {
                            *s = dot(qh, &kc[(j * nkv + kvh) * d..(j * nkv + kvh + 1) * d]) * scale;
                        }
                        softmax(&mut scores);
                        let oh = &mut o[hh * d..(hh + 1) * d];
                        for (p, j) in scores.iter().zip(first..=pos) {
                            let vj = &vc[(j * nkv + kvh) * d..(j * nkv + kvh + 1) * d];
                            oh.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                        }
                    }
                });
            start += t;
        }
        a.o_proj.forward(&out, n)
    }

    /// Routed experts for (N, C) inputs. Tokens are grouped by expert, so
    /// each active expert's weights are read once per call for all of its
    /// tokens, as the GPU engine does.
    fn moe(&self, moe: &Moe, h: &[f32], n: usize, policy: Resolved) -> Vec<f32> {
        let cfg = &self.config;
        let mc = cfg.moe.as_ref().expect("MoE layer in a model without an MoE config");
        let c = cfg.hidden_size;
        let router_logits = moe.gate.forward(h, n);
        let e_count = moe.experts.len();
        // Per expert: (token row, routing weight).
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_count];
        if policy == Resolved::Exact {
            for t in 0..n {
                for (e, w) in route(&router_logits[t * e_count..(t + 1) * e_count], mc.top_k, mc.routing) {
                    assigned[e].push((t, w));
                }
            }
        } else {
            // The batch's exact top-K choices, best first, rewritten by the
            // policy; padded slots keep weight 0 and add nothing.
            let k = mc.top_k;
            let ids: Vec<u32> = (0..n)
                .flat_map(|t| route(&router_logits[t * e_count..(t + 1) * e_count], k, mc.routing))
                .map(|(e, _)| e as u32)
                .collect();
            let renormalize = mc.routing.renormalize || !mc.routing.softmax_then_topk;
            let sel = select_cpu(policy, &router_logits, &ids, e_count, k, renormalize);
            for (slot, (&e, &w)) in sel.ids.iter().zip(&sel.weights).enumerate() {
                assigned[e as usize].push((slot / k, w));
            }
        }
        let mut out = vec![0f32; n * c];
        // Experts in index order, like transformers' loop, so sums round alike.
        for (expert, tokens) in moe.experts.iter().zip(&assigned) {
            if tokens.is_empty() {
                continue;
            }
            let xs: Vec<f32> = tokens
                .iter()
                .flat_map(|&(t, _)| h[t * c..(t + 1) * c].iter().copied())
                .collect();
            let ys = expert.forward(&xs, tokens.len());
            for (&(t, w), y) in tokens.iter().zip(ys.chunks(c)) {
                out[t * c..(t + 1) * c].iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
            }
        }
        if let Some((shared, gate)) = &moe.shared_expert {
            // Qwen2-MoE: `F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)`.
            let s = shared.forward(h, n);
            let g = gate.forward(h, n);
            for t in 0..n {
                let g = sigmoid(g[t]);
                out[t * c..(t + 1) * c]
                    .iter_mut()
                    .zip(&s[t * c..(t + 1) * c])
                    .for_each(|(o, s)| *o += g * s);
            }
        }
        out
    }
}

impl Model {
    /// Re-stores every weight matrix in `dtype` (quantising, or widening to
    /// F32), as loading a safetensors checkpoint with `--quant` does. Routers
    /// and the shared-expert gate stay as they are: they are tiny, and routing
    /// decisions are sensitive to their precision (the GGUF exporter keeps
    /// them in F32 too). Matrices whose rows are not whole blocks of `dtype`
    /// stay as they are. A tied LM head stays tied to the embedding.
    pub fn requantize(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
            return Err(Error::InvalidArgument(format!("cannot re-store weights as {dtype}")));
        }
        let conv = |t: &mut QTensor| {
            if t.dtype != dtype && dtype.fits_cols(t.cols()) {
                let vals = t.to_f32();
                *t = QTensor::from_bytes(t.name.clone(), dtype, t.shape.clone(), quantize(dtype, &vals));
            }
        };
        let conv_mlp = |m: &mut Mlp| {
            for l in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                conv(&mut l.weight);
            }
        };
        let tied = self.lm_head.weight.same_storage(&self.embed_tokens);
        conv(&mut self.embed_tokens);
        if tied {
            self.lm_head.weight = self.embed_tokens.clone();
        } else {
            conv(&mut self.lm_head.weight);
        }
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                conv(&mut l.weight);
            }
            match &mut layer.ffn {
                Ffn::Dense(m) => conv_mlp(m),
                Ffn::Moe(moe) => {
                    moe.experts.iter_mut().for_each(conv_mlp);
                    if let Some((m, _gate)) = &mut moe.shared_expert {
                        conv_mlp(m);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Mlp {
    /// `down_proj(silu(gate_proj(x)) * up_proj(x))` for x of shape (T, C).
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut g = self.gate_proj.forward(x, t);
        let u = self.up_proj.forward(x, t);
        g.iter_mut().zip(&u).for_each(|(g, u)| *g = silu(*g) * u);
        self.down_proj.forward(&g, t)
    }
}

/// Turns one token's router logits (E) into its K (expert, weight) pairs,
/// highest weight first.
///
/// ```python
/// routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
/// routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
/// if norm_topk_prob: routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
/// ```
/// Top-k-then-softmax routers equal softmax-then-top-k plus renormalisation,
/// because softmax is monotonic. Ties go to the lower expert index.
pub fn route(router_logits: &[f32], top_k: usize, routing: Routing) -> Vec<(usize, f32)> {
    let mut probs = router_logits.to_vec();
    softmax(&mut probs);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut chosen: Vec<(usize, f32)> = order[..top_k].iter().map(|&e| (e, probs[e])).collect();
    if routing.renormalize || !routing.softmax_then_topk {
        let sum: f32 = chosen.iter().map(|(_, w)| w).sum();
        chosen.iter_mut().for_each(|(_, w)| *w /= sum);
    }
    chosen
}

/// RMSNorm over rows of `w.len()` values:
/// `x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, row) in out.chunks_mut(w.len()).zip(x.chunks(w.len())) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = w * (v * inv);
        }
    }
    out
}

/// Rotary position embedding of one head vector at position `pos`.
/// NeoX (`rotate_half`): dimension i pairs with i + D/2. Interleaved:
/// 2i pairs with 2i + 1. Both use `inv_freq[i] = theta^(-2i/D)`.
pub fn rope(x: &mut [f32], pos: usize, theta: f32, style: RopeStyle) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        // transformers computes inv_freq in f32 and the angle in f32.
        let inv_freq = 1.0 / theta.powf((2 * i) as f32 / d as f32);
        let angle = pos as f32 * inv_freq;
        let (sin, cos) = angle.sin_cos();
        let (a, b) = match style {
            RopeStyle::NeoX => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos - x1 * sin;
        x[b] = x1 * cos + x0 * sin;
    }
}

pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_softmax_topk_and_renormalise() {
        let logits = [1.0, 3.0, 2.0, 3.0];
        let plain = route(
            &logits,
            2,
            Routing {
                softmax_then_topk: true,
                renormalize: false,
            },
        );
        // Ties (experts 1 and 3) go to the lower index first.
        assert_eq!(plain.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
        let z: f32 = logits.iter().map(|v: &f32| v.exp()).sum();
        assert!((plain[0].1 - 3f32.exp() / z).abs() < 1e-6);
        let renorm = route(
            &logits,
            2,
            Routing {
                softmax_then_topk: true,
                renormalize: true,
            },
        );
        assert!((renorm[0].1 - 0.5).abs() < 1e-6 && (renorm[1].1 - 0.5).abs() < 1e-6);
    }

    #[test]
    fn rope_styles_agree_up_to_a_permutation() {
        // Interleaved rope on a permuted vector equals NeoX rope on the
        // original, permuted the same way: this is why GGUF Llama weights
        // (rows permuted by llama.cpp's converter) use the interleaved form.
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| i as f32 * 0.3 - 1.0).collect();
        let perm: Vec<usize> = (0..d).map(|j| if j % 2 == 0 { j / 2 } else { j / 2 + d / 2 }).collect();
        let mut neox = x.clone();
        rope(&mut neox, 5, 10000.0, RopeStyle::NeoX);
        let mut inter: Vec<f32> = perm.iter().map(|&p| x[p]).collect();
        rope(&mut inter, 5, 10000.0, RopeStyle::Interleaved);
        for (j, &p) in perm.iter().enumerate() {
            assert!((inter[j] - neox[p]).abs() < 1e-6, "dim {j}");
        }
    }
}
