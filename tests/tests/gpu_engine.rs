//! The GPU engine against the CPU reference on every golden fixture, for
//! the stored f32 weights and for each quant format (the CPU runs the same
//! re-quantised weights, so both sides compute with identical values):
//! a batched, ragged prefill with all logits, then incremental decode steps
//! with sequences of different lengths, then a prefill split into steps.
//!
//! Tolerance: max |logit error| < 1e-4 (measured: at most 1.4e-5).
//!
//! Needs a GPU adapter (CI installs lavapipe). Set LYNX_SKIP_GPU_TESTS=1 to
//! skip on a machine without one.

use lynx::generate::{Engine, StepSpec};
use lynx::gpu::GpuModel;
use lynx::selection::ExpertPolicy;
use lynx::{DType, Logits, Model};
use lynx_tests::{FIXTURES, fixtures_dir};

fn ctx() -> Option<std::sync::Arc<lynx::gpu::GpuContext>> {
    lynx_tests::gpu_ctx()
}

fn load(fixture: &str, dtype: Option<DType>) -> Model {
    let mut m = lynx::load(&fixtures_dir().join(fixture))
        .unwrap_or_else(|e| panic!("{fixture}: {e}"))
        .model;
    if let Some(dt) = dtype {
        m.requantize(dt).unwrap();
    }
    m
}

/// Largest |a - b|, and where.
fn max_err(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).enumerate().fold((0.0, 0), |(m, at), (i, (x, y))| {
        let e = (x - y).abs();
        if e > m { (e, i) } else { (m, at) }
    })
}

/// Runs the same schedule on both engines and returns the largest logit error.
fn compare(fixture: &str, dtype: Option<DType>, step_tokens: usize) -> f32 {
    let ctx = ctx().expect("checked by the caller");
    let cpu = load(fixture, dtype);
    let mut gpu = GpuModel::upload(ctx, &cpu, |_, _| {}).unwrap_or_else(|e| panic!("{fixture}: upload: {e}"));
    gpu.max_step_tokens = step_tokens;
    let v = cpu.config.vocab_size;
    let prompts: [Vec<u32>; 3] = [
        (0..13).map(|i| (i * 7 + 3) % v as u32).collect(),
        vec![5],
        (0..6).map(|i| (i * 11 + 1) % v as u32).collect(),
    ];
    let mut cs: Vec<_> = (0..3).map(|_| cpu.new_sequence()).collect();
    let mut gs: Vec<_> = (0..3).map(|_| gpu.new_sequence()).collect();
    let mut worst = 0f32;
    let mut check = |what: &str, a: &[Vec<f32>], b: &[Vec<f32>]| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let (e, at) = max_err(x, y);
            assert!(
                e < 1e-4,
                "{fixture} {dtype:?} {what}: sequence {i} logit {at} (position {}, token {}): cpu {} gpu {} (err {e})",
                at / v,
                at % v,
                x[at],
                y[at]
            );
            worst = worst.max(e);
        }
    };
    {
        let mut cb: Vec<_> = cs.iter_mut().zip(&prompts).map(|(s, p)| (s, p.as_slice())).collect();
        let mut gb: Vec<_> = gs.iter_mut().zip(&prompts).map(|(s, p)| (s, p.as_slice())).collect();
        let a = cpu.forward(&mut cb, Logits::All).unwrap();
        let b = gpu.forward(&mut gb, Logits::All).unwrap();
        check("prefill", &a, &b);
    }
    // Decode steps: all three, then only two (ragged lengths), one token each.
    for step in 0..4u32 {
        let n = if step < 2 { 3 } else { 2 };
        let toks: Vec<[u32; 1]> = (0..n).map(|i| [(step * 5 + i as u32 * 3 + 2) % v as u32]).collect();
        let mut cb: Vec<_> = cs
            .iter_mut()
            .take(n)
            .zip(&toks)
            .map(|(s, t)| (s, t.as_slice()))
            .collect();
        let mut gb: Vec<_> = gs
            .iter_mut()
            .take(n)
            .zip(&toks)
            .map(|(s, t)| (s, t.as_slice()))
            .collect();
        let a = cpu.forward(&mut cb, Logits::Last).unwrap();
        let b = gpu.forward(&mut gb, Logits::Last).unwrap();
        check(&format!("decode step {step}"), &a, &b);
    }
    for (c, g) in cs.iter().zip(&gs) {
        assert_eq!(c.len(), g.len(), "{fixture}: sequence lengths");
    }
    worst
}

#[test]
fn gpu_matches_cpu_on_every_fixture_and_format() {
    if ctx().is_none() {
        return;
    }
    let mut report = Vec::new();
    for fixture in FIXTURES {
        for dtype in [None, Some(DType::Q8_0), Some(DType::Q4_0), Some(DType::Q4_1)] {
            let e = compare(fixture, dtype, 256);
            report.push(format!(
                "{fixture} {}: {e:.2e}",
                dtype.map_or("f32".into(), |d| d.to_string())
            ));
        }
    }
    eprintln!("max |logit err| GPU vs CPU:\n  {}", report.join("\n  "));
}

#[test]
fn chunked_prefill_matches_one_step() {
    if ctx().is_none() {
        return;
    }
    // Steps of 4 tokens split the 13-token prompt across steps and put
    // pieces of several sequences in one step.
    for fixture in ["llama", "qwen2_moe"] {
        let e = compare(fixture, None, 4);
        eprintln!("{fixture} with 4-token steps: {e:.2e}");
    }
}

/// The KV pool grows past its initial size when sequences need it (the
/// cached keys and values survive the copy), and shrinks back once every
/// sequence has been dropped.
#[test]
fn kv_cache_grows_and_is_freed() {
    let Some(ctx) = ctx() else { return };
    let cpu = load("llama", None);
    let gpu = GpuModel::upload(ctx, &cpu, |_, _| {}).unwrap();
    let initial = gpu.kv_cache_bytes();
    let v = cpu.config.vocab_size as u32;
    let limit = cpu.config.max_position_embeddings;
    // Ten sequences of nearly the whole context (128) need 80 pages of 16,
    // more than the initial 64.
    let (count, n) = (10, limit - 1);
    let prompts: Vec<Vec<u32>> = (0..count)
        .map(|s| (0..n as u32).map(|i| (i * 13 + s * 7 + 1) % v).collect())
        .collect();
    let mut cs: Vec<_> = (0..count).map(|_| cpu.new_sequence()).collect();
    let mut gs: Vec<_> = (0..count).map(|_| gpu.new_sequence()).collect();
    for (i, p) in prompts.iter().enumerate() {
        // One sequence at a time, so the pool grows while others hold pages.
        let a = cpu.forward(&mut [(&mut cs[i], p.as_slice())], Logits::Last).unwrap();
        let b = gpu.forward(&mut [(&mut gs[i], p.as_slice())], Logits::Last).unwrap();
        let (e, at) = max_err(&a[0], &b[0]);
        assert!(e < 1e-4, "sequence {i} after growth: logit {at} err {e}");
    }
    let grown = gpu.kv_cache_bytes();
    assert!(
        grown > initial,
        "the pool should have grown: {grown} vs {initial} bytes"
    );
    // A decode step for the first three after the growth copies.
    let toks = [[1u32], [2], [3]];
    let mut cb: Vec<_> = cs.iter_mut().zip(&toks).map(|(s, t)| (s, t.as_slice())).collect();
    let mut gb: Vec<_> = gs.iter_mut().zip(&toks).map(|(s, t)| (s, t.as_slice())).collect();
    let a = cpu.forward(&mut cb, Logits::Last).unwrap();
    let b = gpu.forward(&mut gb, Logits::Last).unwrap();
    for i in 0..3 {
        let (e, at) = max_err(&a[i], &b[i]);
        assert!(e < 1e-4, "decode after growth, sequence {i}: logit {at} err {e}");
    }
    drop(gs);
    let mut s = gpu.new_sequence();
    gpu.forward(&mut [(&mut s, &[1u32, 2, 3][..])], Logits::Last).unwrap();
    assert_eq!(
        gpu.kv_cache_bytes(),
        initial,
        "an idle pool shrinks back to its initial size"
    );
}

/// A truncated sequence continues exactly like a fresh one fed only the
/// kept prefix, also when the cut frees KV pages (positions 40 -> 20 with
/// pages of 16).
#[test]
fn truncated_sequence_continues_like_a_fresh_one() {
    let Some(ctx) = ctx() else { return };
    let gpu = GpuModel::upload(ctx, &load("mixtral", None), |_, _| {}).unwrap();
    let v = gpu.config.vocab_size as u32;
    let long: Vec<u32> = (0..40u32).map(|i| (i * 17 + 3) % v).collect();
    let mut cut = gpu.new_sequence();
    gpu.forward(&mut [(&mut cut, long.as_slice())], Logits::Last).unwrap();
    cut.truncate(20);
    assert_eq!(cut.len(), 20);
    cut.truncate(30);
    assert_eq!(cut.len(), 20, "truncating to a longer length changes nothing");
    let mut fresh = gpu.new_sequence();
    gpu.forward(&mut [(&mut fresh, &long[..20])], Logits::Last).unwrap();
    for tok in [5u32, 9, 2] {
        let a = gpu.forward(&mut [(&mut cut, &[tok][..])], Logits::Last).unwrap();
        let b = gpu.forward(&mut [(&mut fresh, &[tok][..])], Logits::Last).unwrap();
        assert_eq!(a, b, "after token {tok}");
    }
}

/// Prefills `b` sequences, then decodes `steps` steps (fixed token
/// schedule) under a policy, on either engine, asking for the step metrics
/// when `metrics`; returns every call's logits.
fn decode_run<E: Engine>(
    engine: &E,
    b: usize,
    steps: usize,
    policy: ExpertPolicy,
    metrics: bool,
) -> Vec<Vec<Vec<f32>>> {
    let v = engine.config().vocab_size as u32;
    let run = |batch: &mut [(&mut E::Seq, &[u32])], spec: StepSpec| {
        let spec = if metrics { spec.with_metrics() } else { spec };
        pollster::block_on(engine.run(batch, spec)).unwrap().logits
    };
    let mut seqs: Vec<_> = (0..b).map(|_| engine.new_sequence()).collect();
    let prompts: Vec<Vec<u32>> = (0..b as u32)
        .map(|i| (0..3 + i % 4).map(|j| (i * 31 + j * 7 + 1) % v).collect())
        .collect();
    let mut out = Vec::new();
    let mut batch: Vec<_> = seqs.iter_mut().zip(&prompts).map(|(s, p)| (s, p.as_slice())).collect();
    out.push(run(&mut batch, StepSpec::prefill(Logits::Last)));
    for step in 0..steps as u32 {
        let toks: Vec<[u32; 1]> = (0..b as u32).map(|i| [(step * 13 + i * 5 + 2) % v]).collect();
        let mut batch: Vec<_> = seqs.iter_mut().zip(&toks).map(|(s, t)| (s, t.as_slice())).collect();
        out.push(run(&mut batch, StepSpec::decode(policy)));
    }
    out
}

#[test]
fn exact_policy_is_bit_identical_and_lynx_at_batch_one_changes_nothing() {
    let Some(ctx) = ctx() else { return };
    let cpu = load("mixtral", None);
    let gpu = GpuModel::upload(ctx, &cpu, |_, _| {}).unwrap();
    let base = decode_run(&gpu, 4, 3, ExpertPolicy::Exact, false);
    // Collecting metrics, and choosing `exact` explicitly, change no bit.
    assert_eq!(decode_run(&gpu, 4, 3, ExpertPolicy::Exact, true), base);
    // B = 1: every vote scores 1^bin = 1, so Lynx keeps the exact routing.
    let one = decode_run(&gpu, 1, 3, ExpertPolicy::Exact, true);
    assert_eq!(decode_run(&gpu, 1, 3, ExpertPolicy::Lynx(None), true), one);
}

#[test]
fn lynx_reduces_distinct_experts_only_in_decode_steps() {
    let Some(ctx) = ctx() else { return };
    let cpu = load("mixtral", None);
    let gpu = GpuModel::upload(ctx, &cpu, |_, _| {}).unwrap();
    let exact = decode_run(&gpu, 8, 2, ExpertPolicy::Exact, false);
    let rx = gpu.subscribe();
    let lynx = decode_run(&gpu, 8, 2, ExpertPolicy::Lynx(None), true);
    // The prefill step routes exactly, whatever the policy.
    assert_eq!(lynx[0], exact[0], "prefill logits under lynx");
    let steps: Vec<_> = rx.try_iter().collect();
    assert_eq!(steps.len(), 3);
    assert!(!steps[0].decode && steps[0].policy == "exact");
    let (e, k) = (8, 2);
    let mut reduced = 0;
    for m in &steps[1..] {
        assert!(m.decode && m.policy == "lynx", "{m:?}");
        assert_eq!(m.tokens, 8);
        for l in &m.layers {
            assert!(l.distinct_selected <= l.distinct_exact, "layer {}: {l:?}", l.layer);
            assert!(l.distinct_selected >= k);
            assert_eq!(l.tokens_per_expert.len(), e);
            assert_eq!(l.tokens_per_expert.iter().sum::<u32>() as usize, 8 * k);
            assert_eq!(l.bins.len(), 8 * k);
            // Top-1 slots are in bin 0 and never remapped.
            for t in 0..8 {
                assert_eq!(l.bins[t * k], 0);
                assert!(!l.remapped[t * k]);
            }
            reduced += l.distinct_exact - l.distinct_selected;
        }
    }
    assert!(
        reduced > 0,
        "Lynx should drop some experts over 8 tokens, 2 steps and {} layers",
        cpu.config.num_layers
    );
    for row in lynx.iter().flatten() {
        assert!(row.iter().all(|x| x.is_finite()));
    }
}

/// The CPU reference runs every selection policy through `select_cpu`, so
/// a whole decode under lynx, oea and top-N has an oracle: the GPU engine
/// (selection kernels rewriting its routing buffer) matches it, and each
/// policy changes some decode logits against exact routing.
#[test]
fn gpu_decode_under_every_policy_matches_the_cpu_reference() {
    let Some(ctx) = ctx() else { return };
    let cpu = load("mixtral", None);
    let gpu = GpuModel::upload(ctx, &cpu, |_, _| {}).unwrap();
    let (b, steps) = (8, 3);
    let exact = decode_run(&cpu, b, steps, ExpertPolicy::Exact, false);
    for policy in [
        ExpertPolicy::Lynx(None),
        ExpertPolicy::Oea { k0: 1 },
        ExpertPolicy::TopK(1),
    ] {
        let want = decode_run(&cpu, b, steps, policy, false);
        let got = decode_run(&gpu, b, steps, policy, false);
        let mut worst = (0.0f32, 0, 0, 0);
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            for (q, (g, w)) in g.iter().zip(w).enumerate() {
                let (e, at) = max_err(g, w);
                if e > worst.0 {
                    worst = (e, s, q, at);
                }
            }
        }
        eprintln!("{policy}: GPU vs CPU max |err| {:.2e}", worst.0);
        assert!(
            worst.0 < 1e-4,
            "{policy}: step {}, sequence {}, logit {}: |err| = {:.2e}",
            worst.1,
            worst.2,
            worst.3,
            worst.0
        );
        // Prefill routes exactly under every policy; each policy moves
        // some expert choice of 8 tokens over 3 decode steps, so the oracle
        // is not just exact routing again.
        assert_eq!(want[0], exact[0], "{policy}: prefill");
        assert_ne!(want[1..], exact[1..], "{policy}: decode unchanged");
    }
}
