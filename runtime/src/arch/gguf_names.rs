//! GGUF checkpoints: config from `{arch}.*` metadata, and tensor names.
//!
//! The model builder asks for tensors by their Hugging Face names;
//! [`GgufSource`] answers with the llama.cpp tensor of the same role, so one
//! builder serves both formats. Only llama.cpp's `llama` architecture is
//! accepted (dense, or Mixtral-style with `expert_count`), because that is
//! what we can check against a reference here: SmolLM2's GGUF and the files
//! `lynx quantize` writes.
//!
//! llama.cpp's converter permutes the rows of Llama's Q and K weights so that
//! its rope pairs adjacent dimensions; we keep the file's order and use
//! [`RopeStyle::Interleaved`], which is the same function (see the
//! `rope_styles_agree_up_to_a_permutation` test).

use std::path::Path;

use crate::config::{Arch, ModelConfig, MoeConfig, QkNorm, RopeStyle, Routing};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::safetensors_dir::{TensorInfo, TensorSource};
use crate::tensor::QTensor;

pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::UnsupportedArch {
            path: g.path.clone(),
            arch: format!("{arch} (GGUF)"),
            supported: "llama (GGUF: dense, or with experts as Mixtral)",
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| g.get_usize(&key(k));
    let opt = |k: &str| g.opt_usize(&key(k));
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
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
    let intermediate = u("feed_forward_length")?;
    let moe = match opt("expert_count")?.filter(|&e| e > 0) {
        None => None,
        Some(experts) => Some(MoeConfig {
            num_experts: experts,
            top_k: u("expert_used_count")?,
            expert_intermediate_size: opt("expert_feed_forward_length")?.unwrap_or(intermediate),
            // llama.cpp's Mixtral: softmax, top-k, renormalise.
            routing: Routing {
                softmax_then_topk: true,
                renormalize: true,
            },
            shared_expert_intermediate_size: None,
            dense_layers: Vec::new(),
        }),
    };
    Ok(ModelConfig {
        arch: if moe.is_some() { Arch::Mixtral } else { Arch::Llama },
        vocab_size: vocab,
        hidden_size: hidden,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: opt("attention.head_count_kv")?.unwrap_or(heads),
        head_dim: opt("rope.dimension_count")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
        intermediate_size: intermediate,
        rms_norm_eps: g.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_style: RopeStyle::Interleaved,
        max_position_embeddings: u("context_length")?,
        // A GGUF without `output.weight` ties the head to the embeddings.
        tie_word_embeddings: !g.contains("output.weight"),
        attention_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
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
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        _ => return None,
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
        self.file.tensor(&self.resolve(name))
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
