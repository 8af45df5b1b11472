//! Lynx runtime: model loading (Hugging Face safetensors directories and
//! GGUF files), tokenisation and chat templates, the plain-Rust CPU reference
//! forward pass, sampling and generation.
//!
//! Dimension letters used throughout: B batch (sequences), T tokens,
//! C hidden size, H attention heads, D head dim, V vocabulary,
//! E experts, K experts per token (top-k), I expert intermediate size.

//!
//! The library is only the runtime: the `lynx` command line, the HTTP
//! server, `lynx bench` / `lynx eval` and the static site server are the
//! crate `lynx-cli`, so that this crate (and its wasm build) depends on no
//! command-line, HTTP or async-runtime crates.

pub mod arch;
pub mod config;
pub mod error;
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
pub mod tensor;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use loader::{LoadedModel, load};
pub use model::{Logits, Model, Sequence};
pub use tensor::{DType, QTensor, WeightVec};
pub use tokenizer::{ChatMessage, Tokenizer};
