//! Dense Qwen3: `Qwen3ForCausalLM`. A Llama with a per-head RMSNorm on q and
//! k (D weights shared by all heads) before rotary embeddings, an explicit
//! `head_dim` that need not be hidden / heads, and `attention_bias`.

use super::HfConfig;
use crate::config::{Arch, ModelConfig, QkNorm};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = c.base(Arch::Qwen3)?;
    cfg.qk_norm = QkNorm::PerHead;
    if c.bool_or("use_sliding_window", false)? {
        cfg.sliding_window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    }
    Ok(cfg)
}
