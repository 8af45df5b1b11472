//! Lynx runtime: model loading (Hugging Face safetensors directories and
//! GGUF files), tokenisation and chat templates, the plain-Rust CPU reference
//! forward pass, sampling and generation.
//!
//! Dimension letters used throughout: B batch (sequences), T tokens,
//! C hidden size, H attention heads, D head dim, V vocabulary,
//! E experts, K experts per token (top-k), I expert intermediate size.

pub mod arch;
// `lynx bench` and `lynx eval` block on the GPU between steps, which a
// browser page cannot do; they are native tools.
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod config;
pub mod error;
#[cfg(not(target_arch = "wasm32"))]
pub mod eval;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod linear;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod safetensors_dir;
pub mod sampling;
pub mod selection;
pub mod serving;
// The HTTP server needs sockets and threads, which the wasm32 build has not.
#[cfg(not(target_arch = "wasm32"))]
pub mod server;
/// The demo's static file server (`lynx web`): sockets and threads, native only.
#[cfg(not(target_arch = "wasm32"))]
pub mod static_site;
pub mod tensor;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use loader::{LoadedModel, load};
pub use model::{Logits, Model, Sequence};
pub use tensor::{DType, QTensor, WeightVec};
pub use tokenizer::{ChatMessage, Tokenizer};
