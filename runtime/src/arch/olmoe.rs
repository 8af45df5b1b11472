//! OLMoE: `OlmoeForCausalLM`. Its q/k RMSNorm spans the whole projected
//! vector (H*D and H_kv*D weights), it may clamp q/k/v (`clip_qkv`), and it
//! renormalises top-k weights only when `norm_topk_prob` is set.

use super::HfConfig;
use crate::config::{Arch, ModelConfig, MoeConfig, QkNorm, Routing};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = c.base(Arch::Olmoe)?;
    cfg.qk_norm = QkNorm::Full;
    cfg.clip_qkv = c.opt_f32("clip_qkv")?;
    cfg.moe = Some(MoeConfig {
        num_experts: c.usize_any(&["num_experts", "num_local_experts"])?,
        top_k: c.usize("num_experts_per_tok")?,
        expert_intermediate_size: cfg.intermediate_size,
        routing: Routing {
            softmax_then_topk: true,
            renormalize: c.bool_or("norm_topk_prob", false)?,
        },
        shared_expert_intermediate_size: None,
        dense_layers: Vec::new(),
    });
    Ok(cfg)
}
