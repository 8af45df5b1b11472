//! Dense Qwen2 / Qwen2.5: `Qwen2ForCausalLM`. A Llama with biases on the q,
//! k and v projections (always; the config has no switch for them) and an
//! optional sliding window.

use super::HfConfig;
use crate::config::{Arch, ModelConfig};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = c.base(Arch::Qwen2)?;
    cfg.attention_bias = true;
    if c.bool_or("use_sliding_window", false)? {
        cfg.sliding_window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    }
    Ok(cfg)
}
