//! The wgpu/WGSL GPU engine.
//!
//! - [`context`]: adapter selection, device, optional features and limits,
//!   buffers ([`GpuTensor`]), submission and read-back, error mapping.
//! - [`pipelines`]: the embedded shaders (`shaders/*.wgsl`) and the pipeline
//!   cache keyed by file, entry point, includes and defines.
//! - [`weights`]: [`GpuMatrix`], a weight matrix in its stored quant format,
//!   split into row chunks that each fit one storage binding.
//! - [`kernels`], [`attention`], [`moe`], [`selection`]: one host function
//!   per kernel (matmul, embedding gather, RMSNorm, RoPE, SwiGLU, residual
//!   add; paged KV cache and split attention; routing, grouping by expert,
//!   grouped expert matmuls and combine; the expert-selection policies),
//!   each checked against a CPU implementation in `tests.rs` and
//!   `tests_moe_attention.rs`.
//! - [`engine`]: [`GpuModel`], the whole forward pass for a batch of
//!   sequences: upload, chunking a call into steps, the LM head, the step
//!   metrics; `layer.rs`: `GpuLayer`, `GpuAttention`, `GpuMlp` and `GpuMoe`
//!   with their `forward`s, mirroring `model.rs` (the MoE block holds the
//!   routing buffer that a selection policy rewrites); `step.rs`: a step's
//!   inputs and its grow-only scratch; [`kv_cache`]: the paged KV cache.
//! - [`bench`]: kernel micro-benchmarks (matmul on GPU and CPU, selection).
//!
//! Typical use: upload, record kernels into an encoder, submit, read back.
//!
//! ```no_run
//! # fn main() -> lynx::Result<()> {
//! use lynx::gpu::{GpuContext, GpuMatrix, GpuOptions, matmul_nt};
//! # let weight: lynx::QTensor = unimplemented!();
//! let ctx = GpuContext::new(GpuOptions::from_env())?;
//! let w = GpuMatrix::upload(&ctx, &weight)?; // (N, C)
//! let (n, c) = (w.rows, w.cols);
//! let x = ctx.upload_f32("x", &vec![1.0; 2 * c], &[2, c])?;
//! let y = ctx.zeros_f32("y", &[2, n])?;
//! let mut enc = ctx.encoder("example");
//! matmul_nt(&ctx, &mut enc, &x, &w, None, &y)?;
//! ctx.submit(enc)?;
//! let y = ctx.read_f32(&y)?;
//! # Ok(()) }
//! ```

pub mod attention;
// Benchmarks block on the GPU and time with std's clock: native only.
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod context;
pub mod engine;
pub mod kernels;
pub mod kv_cache;
mod layer;
pub mod moe;
pub mod pipelines;
pub mod selection;
mod step;
pub mod upload;
pub mod weights;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_moe_attention;

#[cfg(not(target_arch = "wasm32"))]
pub use bench::{bench_cpu_matmul, bench_matmul, bench_selection};
pub use context::{Elem, GpuContext, GpuEncoder, GpuFeatures, GpuOptions, GpuTensor};
pub use engine::{GpuModel, StepStats};
pub use kernels::{add, embed_rows, matmul_nt, rms_norm_rows, rope_heads, silu_mul};
pub use kv_cache::{GpuSequence, KV_PAGE};
pub use pipelines::{DefineValue, ShaderSpec};
pub use upload::{GgufStreamLoad, WeightStream};
pub use weights::GpuMatrix;
