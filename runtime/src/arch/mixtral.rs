//! Mixtral: `MixtralForCausalLM`. Experts live under `block_sparse_moe`
//! (`w1` gate, `w3` up, `w2` down) in the original layout, and the router
//! always renormalises its top-k probabilities.

use super::HfConfig;
use crate::config::{Arch, ModelConfig, MoeConfig, Routing};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = c.base(Arch::Mixtral)?;
    // Zero or null means full attention.
    cfg.sliding_window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    cfg.moe = Some(MoeConfig {
        num_experts: c.usize_any(&["num_local_experts", "num_experts"])?,
        top_k: c.usize("num_experts_per_tok")?,
        // Mixtral's `intermediate_size` is the size of one expert.
        expert_intermediate_size: cfg.intermediate_size,
        routing: Routing {
            softmax_then_topk: true,
            renormalize: true,
        },
        shared_expert_intermediate_size: None,
        dense_layers: Vec::new(),
    });
    Ok(cfg)
}
