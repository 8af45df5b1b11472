//! Qwen3-MoE: `Qwen3MoeForCausalLM`. Per-head q/k RMSNorm (D weights shared
//! by all heads), no shared expert, `norm_topk_prob`, and the same dense
//! layer rules as Qwen2-MoE.

use super::HfConfig;
use crate::config::{Arch, ModelConfig, MoeConfig, QkNorm, Routing};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = c.base(Arch::Qwen3Moe)?;
    cfg.qk_norm = QkNorm::PerHead;
    if c.bool_or("use_sliding_window", false)? {
        cfg.sliding_window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    }
    cfg.moe = Some(qwen_moe(c, &cfg, None)?);
    Ok(cfg)
}

/// The MoE fields Qwen2-MoE and Qwen3-MoE spell alike. A layer is sparse
/// when `layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0`.
pub(super) fn qwen_moe(c: &HfConfig, cfg: &ModelConfig, shared: Option<usize>) -> Result<MoeConfig> {
    let step = c.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
    let mlp_only = c.usize_list("mlp_only_layers")?;
    let dense_layers = (0..cfg.num_layers)
        .filter(|l| mlp_only.contains(l) || (l + 1) % step != 0)
        .collect();
    Ok(MoeConfig {
        num_experts: c.usize_any(&["num_experts", "num_local_experts", "n_routed_experts"])?,
        top_k: c.usize("num_experts_per_tok")?,
        expert_intermediate_size: c.usize("moe_intermediate_size")?,
        routing: Routing {
            softmax_then_topk: true,
            renormalize: c.bool_or("norm_topk_prob", false)?,
        },
        shared_expert_intermediate_size: shared,
        dense_layers,
    })
}
