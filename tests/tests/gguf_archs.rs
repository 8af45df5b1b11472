//! Golden tests for GGUF files as llama.cpp writes them: one tiny random
//! model per llama.cpp architecture (`models/fixtures/gguf`, made by
//! `models/make_gguf_fixtures.py`), with its weight matrices stored in the
//! block formats real downloads use (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q2_K,
//! Q3_K, Q8_0, Q4_0, Q4_1). The reference logits come from transformers
//! running on gguf-py's dequantisation of the same blocks, so a wrong
//! decoder, tensor name, rope layout or routing rule shows up as a logit
//! error.
//!
//! Tolerance: max |logit - reference| <= 1e-4 on logits of std ~1.3
//! (measured: at most 9.8e-6 on the CPU, 7.6e-6 on lavapipe). Both sides
//! compute in f32 from identical dequantised values; only the summation
//! order differs (errors are printed with `--nocapture`). The MoE fixtures
//! were chosen with a router gap above 1e-3, so no expert choice can flip
//! within that error.
//!
//! The GPU half needs an adapter (CI installs lavapipe); set
//! LYNX_SKIP_GPU_TESTS=1 to skip it.

use lynx::config::Arch;
use lynx::gpu::GpuModel;
use lynx::{DType, Logits};
use lynx_tests::{GoldenSeq, fixtures_dir, golden_ids, max_abs_diff, prefill_all, read_golden_file};

const TOL: f32 = 1e-4;

/// Fixture name, the architecture Lynx must read it as, and whether it has
/// experts.
const GGUF_FIXTURES: [(&str, Arch); 6] = [
    ("qwen2", Arch::Qwen2),
    ("qwen3", Arch::Qwen3),
    ("qwen2moe", Arch::Qwen2Moe),
    ("qwen3moe", Arch::Qwen3Moe),
    ("olmoe", Arch::Olmoe),
    ("llama_moe", Arch::Mixtral),
];

fn golden(name: &str) -> Vec<GoldenSeq> {
    read_golden_file(&fixtures_dir().join("gguf").join(format!("{name}.golden.safetensors")))
}

fn load(name: &str) -> lynx::loader::LoadedModel {
    let path = fixtures_dir().join("gguf").join(format!("{name}.gguf"));
    lynx::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every storage format among the file's tensors, as `lynx inspect` names them.
fn formats(m: &lynx::loader::LoadedModel) -> std::collections::BTreeSet<String> {
    m.tensors.iter().map(|t| t.dtype.clone()).collect()
}

fn check(name: &str, engine: &str, got: &[Vec<f32>], golden: &[GoldenSeq], v: usize) -> f32 {
    let mut worst = 0f32;
    for (i, (g, want)) in got.iter().zip(golden).enumerate() {
        let (err, at) = max_abs_diff(g, &want.logits);
        assert!(
            err <= TOL,
            "{name} ({engine}) sequence {i}: |err| {err} > {TOL} at position {} token {}: got {} want {}",
            at / v,
            at % v,
            g[at],
            want.logits[at]
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn cpu_reference_matches_transformers_on_llama_cpp_ggufs() {
    let mut seen = std::collections::BTreeSet::new();
    for (name, arch) in GGUF_FIXTURES {
        let m = load(name);
        assert_eq!(m.model.config.arch, arch, "{name}: architecture");
        let f = formats(&m);
        seen.extend(f.iter().cloned());
        let golden = golden(name);
        let v = m.model.config.vocab_size;
        let out = prefill_all(&m.model, &golden_ids(&golden));
        let worst = check(name, "cpu", &out, &golden, v);
        eprintln!("{name} ({f:?}): CPU max |err| = {worst:.2e}");
    }
    // The fixtures together cover every block format the loader decodes.
    for dt in [
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ] {
        assert!(
            seen.contains(&dt.to_string()),
            "no fixture stores a tensor as {dt}: {seen:?}"
        );
    }
}

/// The same files through the GPU engine: a batched prefill, then one
/// decode step per token for the longer sequence (KV cache and the
/// decode-shaped kernels).
#[test]
fn gpu_engine_matches_transformers_on_llama_cpp_ggufs() {
    let Some(ctx) = lynx_tests::gpu_ctx() else { return };
    for (name, _) in GGUF_FIXTURES {
        let m = load(name);
        let golden = golden(name);
        let v = m.model.config.vocab_size;
        let gpu = GpuModel::upload(ctx.clone(), &m.model, |_, _| {}).unwrap_or_else(|e| panic!("{name}: upload: {e}"));
        let out = prefill_all(&gpu, &golden_ids(&golden));
        let prefill = check(name, "gpu prefill", &out, &golden, v);

        let g = golden.last().unwrap();
        let mut s = gpu.new_sequence();
        let mut decode = 0f32;
        let first = gpu.forward(&mut [(&mut s, &g.ids[..2])], Logits::Last).unwrap();
        decode = decode.max(max_abs_diff(&first[0], &g.logits[v..2 * v]).0);
        for pos in 2..g.ids.len() {
            let out = gpu
                .forward(&mut [(&mut s, &g.ids[pos..pos + 1])], Logits::Last)
                .unwrap();
            let (err, at) = max_abs_diff(&out[0], &g.logits[pos * v..(pos + 1) * v]);
            assert!(
                err <= TOL,
                "{name} (gpu decode) position {pos}: |err| {err} > {TOL} at token {at}"
            );
            decode = decode.max(err);
        }
        eprintln!("{name}: GPU max |err| prefill {prefill:.2e}, decode {decode:.2e}");
    }
}
