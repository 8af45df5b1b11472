//! GGUF checkpoints: config from `{arch}.*` metadata, and tensor names.
//!
//! The model builder asks for tensors by their Hugging Face names;
//! [`GgufSource`] answers with the llama.cpp tensor of the same role, so one
//! builder serves both formats. Accepted `general.architecture` values are
//! llama.cpp's names for the families the builder implements: `llama`
//! (dense, or Mixtral-style with `expert_count`), `qwen2`, `qwen3`,
//! `qwen2moe`, `qwen3moe` and `olmoe`.
//!
//! What the metadata does not say is read off the tensors present, as
//! llama.cpp does: q/k/v biases (`blk.0.attn_q.bias`), q/k norms, the shared
//! expert, and which layers are dense (no `ffn_gate_inp`).
//!
//! llama.cpp's converter permutes the rows of Llama's Q and K weights so that
//! its rope pairs adjacent dimensions; we keep the file's order and use
//! [`RopeStyle::Interleaved`], which is the same function (see the
//! `rope_styles_agree_up_to_a_permutation` test). The other families are
//! converted unpermuted and use llama.cpp's NEOX rope (rotate-half), which is
//! [`RopeStyle::NeoX`].

use std::path::Path;

use crate::config::{Arch, ModelConfig, MoeConfig, QkNorm, RopeStyle, Routing};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::safetensors_dir::{TensorInfo, TensorSource};
use crate::tensor::QTensor;

/// The GGUF architectures we load, for error messages.
pub const GGUF_SUPPORTED: &str = "llama (dense, or with experts as Mixtral), qwen2, qwen3, qwen2moe, qwen3moe, olmoe";

pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g.get_str("general.architecture")?;
    // (Lynx architecture, MoE, renormalise top-k weights by default, q/k norm, rope pairing)
    // The defaults are llama.cpp's per-architecture `norm_w` in its MoE
    // graph: Mixtral and Qwen3-MoE renormalise, Qwen2-MoE and OLMoE do not.
    let (dense, moe_arch, renorm, qk_norm, rope_style) = match arch {
        "llama" => (Arch::Llama, Arch::Mixtral, true, QkNorm::None, RopeStyle::Interleaved),
        "qwen2" => (Arch::Qwen2, Arch::Qwen2, false, QkNorm::None, RopeStyle::NeoX),
        "qwen3" => (Arch::Qwen3, Arch::Qwen3, false, QkNorm::PerHead, RopeStyle::NeoX),
        "qwen2moe" => (Arch::Qwen2Moe, Arch::Qwen2Moe, false, QkNorm::None, RopeStyle::NeoX),
        "qwen3moe" => (Arch::Qwen3Moe, Arch::Qwen3Moe, true, QkNorm::PerHead, RopeStyle::NeoX),
        "olmoe" => (Arch::Olmoe, Arch::Olmoe, false, QkNorm::Full, RopeStyle::NeoX),
        other => {
            return Err(Error::UnsupportedArch {
                path: g.path.clone(),
                arch: format!("{other} (GGUF)"),
                supported: GGUF_SUPPORTED,
            });
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| g.get_usize(&key(k));
    let opt = |k: &str| g.opt_usize(&key(k));
    let bad = |k: &str, reason: String| Error::Config {
        path: g.path.clone(),
        field: key(k),
        reason,
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    if heads == 0 {
        return Err(bad("attention.head_count", "must be at least 1".into()));
    }
    let vocab = match opt("vocab_size")? {
        Some(v) => v,
        // Older files leave it out; the embedding matrix knows.
        None => g
            .tensor_info("token_embd.weight")
            .map(|t| t.shape[0])
            .ok_or_else(|| Error::MissingTensor {
                path: g.path.clone(),
                name: "token_embd.weight".into(),
            })?,
    };
    // Qwen3 has head_dim 128 with hidden / heads = 64, so the head size is
    // `attention.key_length` when present; llama files say it through the
    // rope dimension count.
    let head_dim = match opt("attention.key_length")? {
        Some(k) => k,
        // `checked_div` keeps a zero head count for `validate` to name.
        None => opt("rope.dimension_count")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
    };
    if let Some(v) = opt("attention.value_length")?
        && v != head_dim
    {
        return Err(bad(
            "attention.value_length",
            format!("{v} differs from the key length {head_dim}, which is not supported"),
        ));
    }
    if let Some(r) = opt("rope.dimension_count")?
        && r != head_dim
    {
        return Err(bad(
            "rope.dimension_count",
            format!("partial rotary embeddings ({r} of {head_dim} dimensions) are not supported"),
        ));
    }
    if let Some(kind) = g.opt_str(&key("rope.scaling.type"))?
        && kind != "none"
    {
        return Err(bad(
            "rope.scaling.type",
            format!("rope scaling `{kind}` is not supported (only none)"),
        ));
    }
    let num_layers = u("block_count")?;
    let experts = opt("expert_count")?.filter(|&e| e > 0);
    // The MoE families have no dense variant (llama has both, qwen2/qwen3
    // only the dense one).
    let moe_only = matches!(arch, "qwen2moe" | "qwen3moe" | "olmoe");
    if experts.is_none() && moe_only {
        return Err(bad("expert_count", "missing (this architecture has experts)".into()));
    }
    // MoE-only families may leave the dense FFN size out.
    let intermediate = match (opt("feed_forward_length")?, experts) {
        (Some(i), _) => i,
        (None, Some(_)) => u("expert_feed_forward_length")?,
        (None, None) => u("feed_forward_length")?,
    };
    let moe = match experts {
        None => None,
        Some(experts) => {
            let shared = match opt("expert_shared_feed_forward_length")? {
                Some(s) => Some(s),
                // Older Qwen2-MoE files: the shared expert's size is its shape.
                None => g.tensor_info("blk.0.ffn_gate_shexp.weight").map(|t| t.shape[0]),
            };
            Some(MoeConfig {
                num_experts: experts,
                top_k: u("expert_used_count")?,
                expert_intermediate_size: opt("expert_feed_forward_length")?.unwrap_or(intermediate),
                routing: Routing {
                    softmax_then_topk: true,
                    renormalize: g.opt_bool(&key("expert_weights_norm"))?.unwrap_or(renorm),
                },
                shared_expert_intermediate_size: shared,
                // A layer without a router is a dense MLP layer.
                dense_layers: (0..num_layers)
                    .filter(|l| !g.contains(&format!("blk.{l}.ffn_gate_inp.weight")))
                    .collect(),
            })
        }
    };
    Ok(ModelConfig {
        arch: if moe.is_some() { moe_arch } else { dense },
        vocab_size: vocab,
        hidden_size: hidden,
        num_layers,
        num_heads: heads,
        num_kv_heads: opt("attention.head_count_kv")?.unwrap_or(heads),
        head_dim,
        intermediate_size: intermediate,
        rms_norm_eps: g.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_style,
        max_position_embeddings: u("context_length")?,
        // A GGUF without `output.weight` ties the head to the embeddings.
        tie_word_embeddings: !g.contains("output.weight"),
        attention_bias: g.contains("blk.0.attn_q.bias"),
        qk_norm,
        clip_qkv: g.opt_f32(&key("attention.clamp_kqv"))?,
        sliding_window: None,
        moe,
    })
}

/// Translates a Hugging Face tensor name to llama.cpp's.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    let role = match stem {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        _ => {
            // Older Mixtral GGUFs keep one tensor per expert:
            // `block_sparse_moe.experts.{e}.w1` is `blk.{l}.ffn_gate.{e}`.
            let rest = stem.strip_prefix("block_sparse_moe.experts.")?;
            let (e, w) = rest.split_once('.')?;
            let role = match w {
                "w1" => "ffn_gate",
                "w3" => "ffn_up",
                "w2" => "ffn_down",
                _ => return None,
            };
            return Some(format!("blk.{layer}.{role}.{e}.{suffix}"));
        }
    };
    Some(format!("blk.{layer}.{role}.{suffix}"))
}

/// A GGUF file seen through Hugging Face tensor names.
pub struct GgufSource<'a> {
    pub file: &'a GgufFile,
}

impl GgufSource<'_> {
    fn resolve(&self, name: &str) -> String {
        if self.file.contains(name) {
            return name.to_string();
        }
        hf_to_gguf(name).unwrap_or_else(|| name.to_string())
    }
}

impl TensorSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn contains(&self, name: &str) -> bool {
        self.file.contains(&self.resolve(name))
    }

    fn get(&self, name: &str) -> Result<QTensor> {
        let gguf_name = self.resolve(name);
        let mut t = self.file.tensor(&gguf_name)?;
        // Qwen2-MoE's shared-expert gate is a (1, C) matrix in transformers;
        // some converters drop the unit dimension.
        if gguf_name.ends_with(".ffn_gate_inp_shexp.weight") && t.shape.len() == 1 {
            t.shape.insert(0, 1);
        }
        Ok(t)
    }

    fn infos(&self) -> Vec<TensorInfo> {
        self.file
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.type_name().to_string(),
                shape: t.shape.clone(),
                bytes: t.nbytes,
            })
            .collect()
    }
}
