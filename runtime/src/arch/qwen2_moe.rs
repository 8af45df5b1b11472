//! Qwen2-MoE: `Qwen2MoeForCausalLM`. Bias on q/k/v, a shared expert whose
//! output is gated by `sigmoid(shared_expert_gate(x))`, `norm_topk_prob`
//! (default false), and dense layers chosen by `mlp_only_layers` and
//! `decoder_sparse_step`.

use super::HfConfig;
use crate::config::{Arch, ModelConfig};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = c.base(Arch::Qwen2Moe)?;
    // Qwen2-MoE always has q/k/v biases; the config has no switch for them.
    cfg.attention_bias = true;
    if c.bool_or("use_sliding_window", false)? {
        cfg.sliding_window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    }
    cfg.moe = Some(super::qwen3_moe::qwen_moe(
        c,
        &cfg,
        c.opt_usize("shared_expert_intermediate_size")?,
    )?);
    Ok(cfg)
}
