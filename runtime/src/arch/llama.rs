//! Dense Llama (SmolLM2 and friends): `LlamaForCausalLM`.

use super::HfConfig;
use crate::config::{Arch, ModelConfig};
use crate::error::Result;

pub fn config(c: &HfConfig) -> Result<ModelConfig> {
    c.base(Arch::Llama)
}
