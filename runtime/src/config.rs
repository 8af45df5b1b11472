//! The architecture-neutral model description that the forward pass runs
//! from. Each module in `arch/` fills it in from its checkpoint's own
//! config spelling (Hugging Face `config.json` or GGUF metadata).

use std::path::Path;

use crate::error::{Error, Result};

/// The largest value any single dimension (hidden size, vocabulary, heads,
/// head size, intermediate sizes) may take. Real checkpoints stay far below
/// it; a larger value is a corrupt or hostile header, and would otherwise
/// reach allocations sized from the config before any tensor is read.
pub const MAX_DIM: usize = 1 << 20;
/// The largest layer count accepted (the layers must also all be present as
/// tensors, which the loader checks before building).
pub const MAX_LAYERS: usize = 4096;
/// The largest context length accepted. Caches grow with the positions a
/// sequence actually uses, so this only guards arithmetic on the value.
pub const MAX_CONTEXT: usize = 1 << 24;
/// The largest number of elements of the embedding matrix (hidden × vocab):
/// 2^34 f32 values are 64 GiB, beyond any model this runtime can hold. A
/// u64, because wasm32's usize cannot hold it.
pub const MAX_EMBEDDING_ELEMS: u64 = 1 << 34;
/// The largest number of routed experts accepted.
pub const MAX_EXPERTS: usize = 1 << 16;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Dense Llama (e.g. SmolLM2).
    Llama,
    /// Dense Qwen2 / Qwen2.5: Llama with q/k/v biases.
    Qwen2,
    /// Dense Qwen3: Llama with per-head q/k RMSNorm.
    Qwen3,
    Mixtral,
    Olmoe,
    Qwen2Moe,
    Qwen3Moe,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, mixtral, olmoe, qwen2_moe, qwen3_moe";

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Mixtral => "mixtral",
            Arch::Olmoe => "olmoe",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }

    /// llama.cpp's `general.architecture` for this family, which also
    /// prefixes its metadata keys; Mixtral is `llama` with experts.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mixtral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Olmoe => "olmoe",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face's `rotate_half`: dimension i pairs with i + D/2.
    NeoX,
    /// GGUF/llama.cpp Llama weights (Q and K rows permuted at conversion):
    /// dimension 2i pairs with 2i + 1.
    Interleaved,
}

/// Where the q/k RMSNorm (if any) is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// OLMoE: over the whole projected q (H*D) and k (H_kv*D) vectors.
    Full,
    /// Qwen3: over each head's D values, weights shared across heads.
    PerHead,
}

/// How router logits become the K expert weights of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Softmax over all E logits, then take the top K probabilities
    /// (Mixtral, OLMoE, Qwen). The alternative, top-k then softmax, is
    /// equivalent to `softmax_then_topk` followed by renormalisation.
    pub softmax_then_topk: bool,
    /// Renormalise the K selected probabilities to sum to 1
    /// (Mixtral always; Qwen/OLMoE when `norm_topk_prob`).
    pub renormalize: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// E.
    pub num_experts: usize,
    /// K.
    pub top_k: usize,
    /// I: intermediate size of one routed expert.
    pub expert_intermediate_size: usize,
    pub routing: Routing,
    /// Qwen2-MoE's always-on shared expert: its intermediate size. Its
    /// output is scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Layers that use a dense MLP (`intermediate_size`) instead of experts.
    pub dense_layers: Vec<usize>,
}

/// Where a [`ModelConfig`] was read from, so that validation errors use the
/// field names the user sees in that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// A Hugging Face `config.json`.
    HfJson,
    /// GGUF metadata (keys prefixed by the llama.cpp architecture name,
    /// e.g. `qwen3moe.expert_count`).
    Gguf,
}

impl ConfigSource {
    /// The name of `field` (given in Hugging Face's common spelling) in
    /// this source's own spelling for `arch`.
    pub fn spelling(self, arch: Arch, field: &str) -> String {
        match self {
            ConfigSource::HfJson => match (arch, field) {
                (Arch::Mixtral, "num_experts") => "num_local_experts".into(),
                (Arch::Mixtral | Arch::Olmoe, "moe_intermediate_size") => "intermediate_size".into(),
                _ => field.into(),
            },
            ConfigSource::Gguf => {
                let key = match field {
                    "hidden_size" => "embedding_length",
                    "vocab_size" => "vocab_size",
                    "num_hidden_layers" => "block_count",
                    "num_attention_heads" => "attention.head_count",
                    "num_key_value_heads" => "attention.head_count_kv",
                    "head_dim" => "rope.dimension_count",
                    "max_position_embeddings" => "context_length",
                    "intermediate_size" => "feed_forward_length",
                    "num_experts" => "expert_count",
                    "num_experts_per_tok" => "expert_used_count",
                    "moe_intermediate_size" => "expert_feed_forward_length",
                    "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
                    "rope_theta" => "rope.freq_base",
                    other => return other.into(),
                };
                format!("{}.{key}", arch.gguf_name())
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// V.
    pub vocab_size: usize,
    /// C.
    pub hidden_size: usize,
    pub num_layers: usize,
    /// H.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// D.
    pub head_dim: usize,
    /// Dense MLP intermediate size (Llama, and dense layers of MoE models).
    pub intermediate_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Context length: the most positions a sequence may hold.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
    pub qk_norm: QkNorm,
    /// OLMoE's optional clamp of q, k and v to [-clip, clip] (`clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// Sliding-window attention span, when the checkpoint enables it.
    pub sliding_window: Option<usize>,
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Checks that the description can be run: every size non-zero and
    /// bounded, heads a multiple of kv heads, 0 < top-k <= experts. Every
    /// source (config.json, GGUF metadata) goes through it before any
    /// weight is read, so that a bad header fails with the field's name
    /// instead of a panic or a giant allocation. `path` is the file the
    /// config came from, for the error message.
    pub fn validate(&self, path: &Path, source: ConfigSource) -> Result<()> {
        let err = |field: &str, reason: String| Error::Config {
            path: path.to_path_buf(),
            field: source.spelling(self.arch, field),
            reason,
        };
        let dim = |field: &str, v: usize, max: usize| -> Result<()> {
            if v == 0 {
                Err(err(field, "must be greater than 0".into()))
            } else if v > max {
                Err(err(field, format!("{v} is larger than the supported maximum {max}")))
            } else {
                Ok(())
            }
        };
        dim("hidden_size", self.hidden_size, MAX_DIM)?;
        dim("vocab_size", self.vocab_size, MAX_DIM)?;
        dim("num_hidden_layers", self.num_layers, MAX_LAYERS)?;
        dim("num_attention_heads", self.num_heads, MAX_DIM)?;
        dim("num_key_value_heads", self.num_kv_heads, MAX_DIM)?;
        dim("head_dim", self.head_dim, MAX_DIM)?;
        dim("max_position_embeddings", self.max_position_embeddings, MAX_CONTEXT)?;
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads ({})",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(err(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
        }
        // The projections are (heads * head_dim) x hidden; bound the product
        // so that later size arithmetic cannot overflow.
        if self.num_heads.saturating_mul(self.head_dim) > MAX_DIM {
            return Err(err(
                "head_dim",
                format!(
                    "num_attention_heads * head_dim = {} * {} is larger than the supported maximum {MAX_DIM}",
                    self.num_heads, self.head_dim
                ),
            ));
        }
        if (self.hidden_size as u64).saturating_mul(self.vocab_size as u64) > MAX_EMBEDDING_ELEMS {
            return Err(err(
                "vocab_size",
                format!(
                    "vocab_size * hidden_size = {} * {} elements is larger than the supported maximum {MAX_EMBEDDING_ELEMS}",
                    self.vocab_size, self.hidden_size
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(err(
                "rms_norm_eps",
                format!("{} is not a finite non-negative number", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(err(
                "rope_theta",
                format!("{} is not a finite positive number", self.rope_theta),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(err("sliding_window", "must be greater than 0".into()));
        }
        let dense_needed = self.moe.as_ref().is_none_or(|m| !m.dense_layers.is_empty());
        if dense_needed {
            dim("intermediate_size", self.intermediate_size, MAX_DIM)?;
        }
        if let Some(m) = &self.moe {
            dim("num_experts", m.num_experts, MAX_EXPERTS)?;
            if m.top_k == 0 || m.top_k > m.num_experts {
                return Err(err(
                    "num_experts_per_tok",
                    format!(
                        "top-k {} must be between 1 and the number of experts ({})",
                        m.top_k, m.num_experts
                    ),
                ));
            }
            dim("moe_intermediate_size", m.expert_intermediate_size, MAX_DIM)?;
            if let Some(s) = m.shared_expert_intermediate_size {
                dim("shared_expert_intermediate_size", s, MAX_DIM)?;
            }
            if let Some(&l) = m.dense_layers.iter().find(|&&l| l >= self.num_layers) {
                return Err(err(
                    "dense_layers",
                    format!("layer {l} is beyond num_hidden_layers ({})", self.num_layers),
                ));
            }
        }
        Ok(())
    }

    /// Whether layer `l` routes to experts (vs. a dense MLP).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| !m.dense_layers.contains(&l))
    }
}
