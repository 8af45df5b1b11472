//! Golden tests: the CPU reference forward pass against logits that
//! transformers computed for the tiny checkpoints in `models/fixtures`
//! (made by `models/make_fixtures.py`).
//!
//! Tolerance: max |logit - reference| <= 1e-4 on logits of std ~1.6 and
//! magnitude up to ~7. Both sides compute in f32 from the same stored
//! weights (bf16/f16 fixtures are upcast exactly), so only the summation
//! order differs; measured errors are printed with `--nocapture`.

use lynx::{Logits, load};
use lynx_tests::{FIXTURES, fixtures_dir, golden_ids, max_abs_diff, nmse, prefill_all, read_golden};

const TOL: f32 = 1e-4;

/// All sequences prefilled together in one batch, logits at every position.
#[test]
fn batched_prefill_matches_transformers_for_every_architecture() {
    for fixture in FIXTURES {
        let m = load(&fixtures_dir().join(fixture)).unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let golden = read_golden(fixture);
        let out = prefill_all(&m.model, &golden_ids(&golden));
        for (i, (got, g)) in out.iter().zip(&golden).enumerate() {
            let (err, at) = max_abs_diff(got, &g.logits);
            let v = m.model.config.vocab_size;
            eprintln!("{fixture}: sequence {i}: max |err| = {err:.2e}");
            assert!(
                err <= TOL,
                "{fixture} seq {i}: |err| {err} > {TOL} at position {} token {}",
                at / v,
                at % v
            );
        }
    }
}

/// Prefill a few tokens, then decode one token per step for a batch whose
/// sequences have different lengths (the shorter one leaves the batch when
/// it ends): exercises the KV cache and ragged batches.
#[test]
fn incremental_decode_matches_transformers_for_every_architecture() {
    for fixture in FIXTURES {
        let m = load(&fixtures_dir().join(fixture)).unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let v = m.model.config.vocab_size;
        let golden = read_golden(fixture);
        let prefill = [3, 5];
        let mut seqs: Vec<_> = golden.iter().map(|_| m.model.new_sequence()).collect();
        let mut worst = 0f32;
        let mut batch: Vec<_> = seqs
            .iter_mut()
            .zip(&golden)
            .zip(prefill)
            .map(|((s, g), p)| (s, &g.ids[..p]))
            .collect();
        let first = m.model.forward(&mut batch, Logits::Last).unwrap();
        for ((got, g), p) in first.iter().zip(&golden).zip(prefill) {
            worst = worst.max(max_abs_diff(got, &g.logits[(p - 1) * v..p * v]).0);
        }
        let longest = golden.iter().map(|g| g.ids.len()).max().unwrap();
        for step in 0.. {
            let mut batch = Vec::new();
            let mut which = Vec::new();
            for (i, (s, g)) in seqs.iter_mut().zip(&golden).enumerate() {
                let pos = prefill[i] + step;
                if pos < g.ids.len() {
                    batch.push((s, &g.ids[pos..pos + 1]));
                    which.push((i, pos));
                }
            }
            if batch.is_empty() {
                break;
            }
            let out = m.model.forward(&mut batch, Logits::Last).unwrap();
            for (got, &(i, pos)) in out.iter().zip(&which) {
                let (err, at) = max_abs_diff(got, &golden[i].logits[pos * v..(pos + 1) * v]);
                assert!(
                    err <= TOL,
                    "{fixture} seq {i} position {pos}: |err| {err} > {TOL} at token {at}"
                );
                worst = worst.max(err);
            }
            assert!(step < longest);
        }
        for (s, g) in seqs.iter().zip(&golden) {
            assert_eq!(s.len(), g.ids.len(), "{fixture}: KV cache length");
        }
        eprintln!("{fixture}: incremental decode max |err| = {worst:.2e}");
    }
}

/// Every fixture written as GGUF in llama.cpp's layout for its
/// architecture (`lynx::export`: `llama` with Q/K rows permuted for its
/// interleaved rope, with Mixtral experts; `qwen2moe`, `qwen3moe`, `olmoe`
/// with biases, q/k norms, shared experts and their gate) and read back.
/// In F32 the configuration survives and the logits still match
/// transformers to `TOL`. Llama and Mixtral are also written in Q8_0:
/// every weight matrix, each expert of the stacked expert tensors
/// included, must equal the original within half a quantisation step, and
/// the dense model's logits must stay within the quantisation error (NMSE
/// measured ~1e-3: random weights amplify Q8_0's 0.6% RMS weight error
/// about sevenfold; the bound leaves 3x headroom). Mixtral's logits are not
/// compared in Q8_0: its router gaps are ~5e-3, and quantisation
/// legitimately flips experts.
#[test]
fn gguf_export_round_trips() {
    for fixture in FIXTURES {
        let m = load(&fixtures_dir().join(fixture)).unwrap();
        let golden = read_golden(fixture);
        let dir = lynx_tests::temp_dir(&format!("gguf-{fixture}"));
        let dtypes: &[lynx::DType] = match fixture {
            "llama" | "mixtral" => &[lynx::DType::F32, lynx::DType::Q8_0],
            _ => &[lynx::DType::F32],
        };
        for &dtype in dtypes {
            let path = dir.join(format!("{fixture}-{dtype}.gguf"));
            let report = lynx::export::write_model_gguf(&m, dtype, &path).unwrap();
            assert!(report.fallbacks.is_empty(), "{fixture} {dtype}: {:?}", report.fallbacks);
            let file = lynx::gguf::GgufFile::open(&path).unwrap();
            assert_eq!(file.get_str("general.architecture").unwrap(), report.arch);
            let g = load(&path).unwrap_or_else(|e| panic!("{fixture} {dtype}: {e}"));
            let (a, b) = (&m.model.config, &g.model.config);
            assert_eq!(
                (a.arch, &a.moe, a.qk_norm, a.attention_bias, a.clip_qkv, a.head_dim),
                (b.arch, &b.moe, b.qk_norm, b.attention_bias, b.clip_qkv, b.head_dim),
                "{fixture}: configuration survives"
            );
            let style = if report.arch == "llama" {
                lynx::config::RopeStyle::Interleaved
            } else {
                lynx::config::RopeStyle::NeoX
            };
            assert_eq!(b.rope_style, style, "{fixture}: rope pairing of `{}`", report.arch);
            for (a, b) in weights(&m.model).iter().zip(weights(&g.model)) {
                assert_close_to_quantised(a, b, dtype);
            }
            if dtype == lynx::DType::Q8_0 && fixture == "mixtral" {
                continue;
            }
            for (i, seq) in golden.iter().enumerate() {
                let mut s = g.model.new_sequence();
                let got = g
                    .model
                    .forward(&mut [(&mut s, &seq.ids[..])], Logits::All)
                    .unwrap()
                    .remove(0);
                let (err, _) = max_abs_diff(&got, &seq.logits);
                let e2 = nmse(&got, &seq.logits);
                eprintln!(
                    "{fixture} as {dtype} `{}` GGUF: sequence {i}: max |err| = {err:.2e}, NMSE = {e2:.2e}",
                    report.arch
                );
                let (tol, nmse_tol) = if dtype == lynx::DType::F32 {
                    (TOL, 1e-10)
                } else {
                    (f32::INFINITY, 5e-3)
                };
                assert!(
                    err <= tol && e2 <= nmse_tol,
                    "{fixture} {dtype} seq {i}: |err| {err}, NMSE {e2}"
                );
            }
        }
    }
}

/// Every matrix whose rows are not permuted by the export (all but Q/K),
/// experts included, in a fixed order.
fn weights(m: &lynx::Model) -> Vec<&lynx::QTensor> {
    use lynx::model::Ffn;
    let mut out = vec![&m.embed_tokens];
    for layer in &m.layers {
        out.push(&layer.self_attn.v_proj.weight);
        out.push(&layer.self_attn.o_proj.weight);
        match &layer.ffn {
            Ffn::Dense(mlp) => out.extend([&mlp.gate_proj.weight, &mlp.up_proj.weight, &mlp.down_proj.weight]),
            Ffn::Moe(moe) => {
                out.push(&moe.gate.weight);
                for e in &moe.experts {
                    out.extend([&e.gate_proj.weight, &e.up_proj.weight, &e.down_proj.weight]);
                }
            }
        }
    }
    out
}

/// `b` holds `a`'s values, rounded to `dtype` (block-wise Q8_0: half a
/// step of `max|block| / 127`).
fn assert_close_to_quantised(a: &lynx::QTensor, b: &lynx::QTensor, dtype: lynx::DType) {
    assert_eq!(a.shape, b.shape, "{} vs {}", a.name, b.name);
    let (x, y) = (a.to_f32(), b.to_f32());
    for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = if dtype == lynx::DType::F32 || b.dtype == lynx::DType::F32 {
            0.0
        } else {
            amax / 127.0 * 0.51 + 1e-3 * amax
        };
        for (j, (p, q)) in xb.iter().zip(yb).enumerate() {
            assert!(
                (p - q).abs() <= tol,
                "{} ({dtype}): value {} is {q}, want {p}",
                b.name,
                blk * 32 + j
            );
        }
    }
}

/// `--to q4_k --embedding q8_0` on a model whose rows are 64 values: no
/// matrix is dropped or refused; each falls back to Q5_0 as llama.cpp's
/// quantiser does, the report names them, and the embedding is Q8_0.
#[test]
fn gguf_export_falls_back_for_rows_that_are_not_whole_blocks() {
    let m = load(&fixtures_dir().join("qwen2_moe")).unwrap();
    let path = lynx_tests::temp_dir("gguf-fallback").join("q4_k.gguf");
    let opts = lynx::export::ExportOptions {
        dtype: lynx::DType::Q4_K,
        embedding: Some(lynx::DType::Q8_0),
    };
    let report = lynx::export::write_model_gguf_with(&m, opts, &path, &mut |_, _| {}).unwrap();
    let g = load(&path).unwrap();
    let dtype_of = |name: &str| {
        g.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .dtype
            .clone()
    };
    assert_eq!(dtype_of("token_embd.weight"), "Q8_0");
    assert_eq!(dtype_of("blk.0.attn_q.weight"), "Q5_0");
    assert_eq!(dtype_of("blk.0.attn_q.bias"), "F32");
    assert_eq!(dtype_of("blk.0.ffn_gate_exps.weight"), "Q5_0");
    assert_eq!(dtype_of("blk.0.ffn_gate_inp_shexp.weight"), "F32");
    assert!(
        report
            .fallbacks
            .iter()
            .any(|(n, dt, why)| n == "blk.0.attn_q.weight" && *dt == lynx::DType::Q5_0 && why.contains("64 values")),
        "{:?}",
        report.fallbacks
    );
    assert_eq!(g.tensors.len(), report.tensors);
}

/// Re-quantising a llama.cpp file with 256-value rows to each K-quant (and
/// Q8_0): the writers round-trip through the reader, and the logits' error
/// grows as the formats get smaller. Random weights amplify weight error
/// (see `gguf_export_round_trips`); measured NMSE: Q8_0 2.5e-4, Q6_K 4.7e-3,
/// Q5_K 1.7e-2, Q4_K 7.2e-2 (Q4_0: 8.7e-2), Q3_K 0.26, Q2_K 0.81. The
/// bounds leave about 3x; per-weight accuracy is tested in `tensor.rs`.
#[test]
fn gguf_export_writes_k_quants() {
    use lynx::DType::*;
    let src = fixtures_dir().join("gguf/qwen2.gguf");
    let m = load(&src).unwrap();
    let golden = lynx_tests::read_golden_file(&fixtures_dir().join("gguf/qwen2.golden.safetensors"));
    let (ids, want) = (&golden[1].ids, &golden[1].logits);
    let mut last = 0.0;
    for (dtype, nmse_tol) in [
        (Q8_0, 1e-3),
        (Q6_K, 1.5e-2),
        (Q5_K, 5e-2),
        (Q4_K, 0.2),
        (Q3_K, 0.8),
        (Q2_K, 2.5),
    ] {
        let out = lynx_tests::temp_dir(&format!("gguf-k-{dtype}")).join("out.gguf");
        let report = lynx::export::write_model_gguf(&m, dtype, &out).unwrap();
        assert!(report.fallbacks.is_empty(), "{dtype}: {:?}", report.fallbacks);
        let g = load(&out).unwrap();
        assert!(
            g.tensors
                .iter()
                .any(|t| t.name == "blk.0.ffn_down.weight" && t.dtype == dtype.to_string()),
            "{dtype}: ffn_down is stored as {dtype}"
        );
        let mut s = g.model.new_sequence();
        let got = g
            .model
            .forward(&mut [(&mut s, &ids[..])], Logits::All)
            .unwrap()
            .remove(0);
        let e2 = nmse(&got, want);
        eprintln!("qwen2 GGUF re-quantised to {dtype}: NMSE {e2:.2e}");
        assert!(e2 <= nmse_tol, "{dtype}: NMSE {e2} > {nmse_tol}");
        assert!(e2 > last, "{dtype}: NMSE {e2} is not above the larger format's {last}");
        last = e2;
    }
}
