//! Writing a loaded model as a GGUF file in llama.cpp's `llama` layout
//! (dense, or with Mixtral-style stacked experts), quantising its matrices.
//! `lynx quantize` uses this so that the next load is fast and small.
//!
//! Only Llama and Mixtral models can be written: those are the GGUF layouts
//! that `arch::gguf_names` reads back, so every file we write round-trips.

use std::path::Path;

use crate::config::{Arch, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::{GgufValue, write_gguf};
use crate::loader::LoadedModel;
use crate::model::{Ffn, Mlp};
use crate::tensor::{DType, QTensor, quantize};

/// Writes `lm` to `path`, with every matrix except the routers in `dtype`.
/// Norms and routers stay f32: they are tiny, and routing decisions are
/// sensitive to their precision.
pub fn write_model_gguf(lm: &LoadedModel, dtype: DType, path: &Path) -> Result<()> {
    let m = &lm.model;
    let cfg = &m.config;
    if !matches!(cfg.arch, Arch::Llama | Arch::Mixtral) {
        return Err(Error::InvalidArgument(format!(
            "GGUF export supports llama and mixtral models, not {}",
            cfg.arch.name()
        )));
    }
    // llama.cpp pairs rope dimensions (2i, 2i+1), so Q and K rows of a
    // Hugging Face (rotate-half) model are permuted, as its converter does:
    // `w.reshape(H, 2, D // 2, C).swapaxes(1, 2).reshape(H * D, C)`.
    let permute = cfg.rope_style == RopeStyle::NeoX;
    let d = cfg.head_dim;
    let head_perm = |heads: usize| -> Vec<usize> {
        (0..heads * d)
            .map(|r| (r / d) * d + if r % 2 == 0 { (r % d) / 2 } else { (r % d) / 2 + d / 2 })
            .collect()
    };

    let mut owned: Vec<QTensor> = Vec::new();
    let conv = |name: String, t: &QTensor, dt: DType, rows: Option<&[usize]>| -> Result<QTensor> {
        if !t.cols().is_multiple_of(dt.block().0) {
            return Err(Error::InvalidArgument(format!(
                "{}: rows of {} values cannot be stored as {dt} (blocks of {})",
                t.name,
                t.cols(),
                dt.block().0
            )));
        }
        if rows.is_none() && t.dtype == dt {
            return Ok(QTensor::from_bytes(name, dt, t.shape.clone(), t.bytes().to_vec()));
        }
        let vals = t.to_f32();
        let vals = match rows {
            None => vals,
            Some(order) => {
                let c = t.cols();
                order
                    .iter()
                    .flat_map(|&r| vals[r * c..(r + 1) * c].iter().copied())
                    .collect()
            }
        };
        Ok(QTensor::from_bytes(name, dt, t.shape.clone(), quantize(dt, &vals)))
    };
    let vector = |name: String, v: &[f32]| QTensor::from_f32(name, vec![v.len()], v);
    // Several experts' matrices (same shape) as one (E, rows, cols) tensor.
    let stack = |name: String, parts: Vec<&QTensor>| -> Result<QTensor> {
        let mut bytes = Vec::new();
        for p in &parts {
            bytes.extend_from_slice(conv(String::new(), p, dtype, None)?.bytes());
        }
        let mut shape = vec![parts.len()];
        shape.extend(&parts[0].shape);
        Ok(QTensor::from_bytes(name, dtype, shape, bytes))
    };

    owned.push(conv("token_embd.weight".into(), &m.embed_tokens, dtype, None)?);
    for (l, layer) in m.layers.iter().enumerate() {
        let p = |role: &str| format!("blk.{l}.{role}.weight");
        let a = &layer.self_attn;
        owned.push(vector(p("attn_norm"), &layer.input_layernorm));
        let qp = head_perm(cfg.num_heads);
        let kp = head_perm(cfg.num_kv_heads);
        owned.push(conv(p("attn_q"), &a.q_proj.weight, dtype, permute.then_some(&qp[..]))?);
        owned.push(conv(p("attn_k"), &a.k_proj.weight, dtype, permute.then_some(&kp[..]))?);
        owned.push(conv(p("attn_v"), &a.v_proj.weight, dtype, None)?);
        owned.push(conv(p("attn_output"), &a.o_proj.weight, dtype, None)?);
        owned.push(vector(p("ffn_norm"), &layer.post_attention_layernorm));
        match &layer.ffn {
            Ffn::Dense(mlp) => {
                owned.push(conv(p("ffn_gate"), &mlp.gate_proj.weight, dtype, None)?);
                owned.push(conv(p("ffn_up"), &mlp.up_proj.weight, dtype, None)?);
                owned.push(conv(p("ffn_down"), &mlp.down_proj.weight, dtype, None)?);
            }
            Ffn::Moe(moe) => {
                owned.push(conv(p("ffn_gate_inp"), &moe.gate.weight, DType::F32, None)?);
                let pick = |f: fn(&Mlp) -> &QTensor| moe.experts.iter().map(f).collect::<Vec<_>>();
                owned.push(stack(p("ffn_gate_exps"), pick(|e| &e.gate_proj.weight))?);
                owned.push(stack(p("ffn_up_exps"), pick(|e| &e.up_proj.weight))?);
                owned.push(stack(p("ffn_down_exps"), pick(|e| &e.down_proj.weight))?);
            }
        }
    }
    owned.push(vector("output_norm.weight".into(), &m.norm));
    if !cfg.tie_word_embeddings {
        owned.push(conv("output.weight".into(), &m.lm_head.weight, dtype, None)?);
    }

    let u = |v: usize| GgufValue::U32(v as u32);
    let mut meta: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), "llama".into()),
        (
            "general.name".into(),
            lm.path
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().to_string())
                .into(),
        ),
        ("llama.block_count".into(), u(cfg.num_layers)),
        ("llama.context_length".into(), u(cfg.max_position_embeddings)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.attention.head_count".into(), u(cfg.num_heads)),
        ("llama.attention.head_count_kv".into(), u(cfg.num_kv_heads)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(cfg.rms_norm_eps),
        ),
        ("llama.rope.freq_base".into(), GgufValue::F32(cfg.rope_theta)),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
    ];
    if let Some(moe) = &cfg.moe {
        meta.push(("llama.expert_count".into(), u(moe.num_experts)));
        meta.push(("llama.expert_used_count".into(), u(moe.top_k)));
        meta.push((
            "llama.expert_feed_forward_length".into(),
            u(moe.expert_intermediate_size),
        ));
    }
    if let Some(tok) = &lm.tokenizer {
        meta.extend(tok.gguf_metadata()?);
    }
    let refs: Vec<&QTensor> = owned.iter().collect();
    write_gguf(path, &meta, &refs)
}
