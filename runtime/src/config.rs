//! The architecture-neutral model description that the forward pass runs
//! from. Each module in `arch/` fills it in from its checkpoint's own
//! config spelling (Hugging Face `config.json` or GGUF metadata).

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
    /// Whether layer `l` routes to experts (vs. a dense MLP).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| !m.dense_layers.contains(&l))
    }
}
