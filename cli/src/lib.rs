//! The applications over the Lynx runtime (crate `lynx`): the `lynx`
//! command line (`src/bin/lynx.rs`), the OpenAI-compatible HTTP server
//! with its load generator, `lynx bench` and `lynx eval` with their
//! embedded evaluation data, and the static site server behind `lynx web`.
//!
//! They live outside the runtime so that the library, and its wasm build,
//! carry no command-line, HTTP or async-runtime dependencies (clap,
//! indicatif, anyhow, axum, tokio, hyper). Everything here is native: it
//! blocks on the GPU between steps, or needs sockets and threads.

pub mod bench;
pub mod eval;
pub mod server;
pub mod static_site;
