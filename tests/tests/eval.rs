//! `lynx_cli::eval` on the GPU engine: the teacher-forced text scores of the
//! expert-selection policies against exact routing, on the tiny Mixtral
//! fixture (E = 8, K = 2; it has no tokenizer, so the windows are token
//! ids), and the whole evaluation, question answering included, on the demo
//! MoE when it is present.
//!
//! Needs a GPU adapter (CI installs lavapipe). Set LYNX_SKIP_GPU_TESTS=1 to
//! skip on a machine without one.

use lynx::gpu::GpuModel;
use lynx::selection::ExpertPolicy;
use lynx_cli::eval::{EvalData, EvalOptions, QaItem, TextScores, eval_policies, score_text};
use lynx_tests::fixtures_dir;

fn fixture_gpu(name: &str) -> Option<GpuModel> {
    let ctx = lynx_tests::gpu_ctx()?;
    let model = lynx::load(&fixtures_dir().join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .model;
    Some(GpuModel::upload(ctx, &model, |_, _| {}).unwrap_or_else(|e| panic!("{name}: upload: {e}")))
}

/// `n` windows of `w` pseudo-random token ids below `vocab`, all different.
fn windows(n: usize, w: usize, vocab: u32) -> Vec<Vec<u32>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            (0..w)
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn assert_same_as_reference(what: &str, s: &TextScores, reference: &TextScores) {
    assert_eq!(s.tokens, reference.tokens, "{what}");
    assert_eq!(
        s.nll, reference.nll,
        "{what}: same logits give the same NLL, bit for bit"
    );
    assert_eq!(s.ppl() / reference.ppl(), 1.0, "{what}");
    assert_eq!(s.agreement(), 1.0, "{what}");
    assert_eq!(s.mean_kl(), 0.0, "{what}");
    assert_eq!(s.max_kl(), 0.0, "{what}");
}

#[test]
fn exact_control_matches_reference_and_topk1_differs() {
    let Some(gpu) = fixture_gpu("mixtral") else { return };
    let (b, w, prefix) = (4, 20, 2);
    let wins = windows(b, w, gpu.config.vocab_size as u32);
    let policies = [ExpertPolicy::Exact, ExpertPolicy::TopK(1)];
    let mut steps = 0;
    let (reference, rows) = score_text(&gpu, &wins, b, prefix, &policies, &mut |_| steps += 1).unwrap();
    assert!(steps > 0, "progress is reported");

    let scored = b * (w - prefix - 1);
    assert_eq!(reference.tokens, scored);
    assert_eq!(reference.kl.len(), scored);
    assert_eq!(reference.window_nll.len(), b);
    assert!(reference.ppl().is_finite() && reference.ppl() > 1.0);
    assert_same_as_reference("exact control", &rows[0], &reference);

    // Every decode step's routing metrics were read: exact loads what the
    // exact routing wants; top-1 loads at most one expert per token.
    let (want, loaded) = rows[0].distinct_experts().expect("MoE metrics");
    assert_eq!(rows[0].metric_steps, w - prefix - 1);
    assert_eq!(want, loaded);
    let topk = &rows[1];
    let (want1, loaded1) = topk.distinct_experts().expect("MoE metrics");
    // (The exact routing it departs from differs from the reference's after
    // the first MoE layer: the hidden states there already feel the policy.)
    assert!(
        loaded1 <= b as f64 && loaded1 < want1,
        "top-1 loads {loaded1} of {want1}"
    );

    // Dropping each token's second expert changes the distributions.
    assert_eq!(topk.tokens, scored);
    assert!(topk.mean_kl() > 0.0, "mean KL {}", topk.mean_kl());
    assert!(topk.kl.iter().all(|&k| k >= 0.0));
    assert!(topk.nll != reference.nll);
    assert!(topk.agreement() <= 1.0);
    let (worst, kl) = topk.worst_window().unwrap();
    assert!(worst < b && kl >= topk.mean_kl() - 1e-12);
}

#[test]
fn lynx_at_batch_one_is_exact() {
    // With one sequence per step, every expert a token wants has a bin-0
    // vote or is its own top-1, so Lynx changes nothing; several rounds of
    // one window each go through the whole schedule.
    let Some(gpu) = fixture_gpu("olmoe") else { return };
    let wins = windows(3, 10, gpu.config.vocab_size as u32);
    let policies = [ExpertPolicy::Lynx(None), ExpertPolicy::Exact];
    let (reference, rows) = score_text(&gpu, &wins, 1, 1, &policies, &mut |_| {}).unwrap();
    assert_eq!(reference.tokens, 3 * 8);
    assert_eq!(reference.window_nll.len(), 3);
    assert_same_as_reference("lynx at B=1", &rows[0], &reference);
    assert_same_as_reference("exact control", &rows[1], &reference);
}

#[test]
fn bad_inputs_fail_before_running() {
    let Some(gpu) = fixture_gpu("mixtral") else { return };
    let wins = windows(4, 12, gpu.config.vocab_size as u32);
    let err = |r: lynx::Result<(TextScores, Vec<TextScores>)>| r.unwrap_err().to_string();
    // topk=3 is more than K = 2.
    let e = err(score_text(&gpu, &wins, 4, 1, &[ExpertPolicy::TopK(3)], &mut |_| {}));
    assert!(e.contains("topk=3"), "{e}");
    let e = err(score_text(&gpu, &wins, 3, 1, &[ExpertPolicy::Exact], &mut |_| {}));
    assert!(e.contains("whole batches"), "{e}");
    let e = err(score_text(&gpu, &wins, 4, 11, &[ExpertPolicy::Exact], &mut |_| {}));
    assert!(e.contains("nothing to score"), "{e}");
    let mut bad = wins.clone();
    bad[1][3] = gpu.config.vocab_size as u32;
    let e = err(score_text(&gpu, &bad, 4, 1, &[ExpertPolicy::Exact], &mut |_| {}));
    assert!(e.contains("outside the vocabulary"), "{e}");
}

/// The whole evaluation, text and questions, on the demo MoE, small: two
/// windows and three questions. The demo model is part of the repository;
/// the test says so and passes when it is absent (e.g. while it is rebuilt).
#[test]
fn demo_moe_end_to_end() {
    // (The path is spelled out rather than taken from `lynx::loader`, so
    // that this test does not depend on how the default model is chosen.)
    let path = lynx_tests::repo_root().join("models/lynx-moe-135m/lynx-moe-135m.Q4_0.gguf");
    if !path.exists() {
        eprintln!("demo MoE test skipped: {} is not there", path.display());
        return;
    }
    let Some(ctx) = lynx_tests::gpu_ctx() else { return };
    let lm = lynx::load(&path).unwrap();
    let tok = lm.tokenizer.as_ref().expect("the demo GGUF has a tokenizer");
    let gpu = GpuModel::upload(ctx, &lm.model, |_, _| {}).unwrap();
    let q = |question: &str, answer: &str| QaItem {
        id: None,
        question: question.into(),
        answer: answer.into(),
        aliases: vec![],
    };
    let data = EvalData {
        text: lynx_cli::eval::HELDOUT_TEXT.to_string(),
        questions: vec![
            q("What is the capital of France?", "Paris"),
            q("What color is grass?", "green"),
            q("What is the opposite of hot?", "cold"),
        ],
    };
    let opts = EvalOptions {
        batch: 2,
        window: 12,
        qa_max_new_tokens: 6,
        ..EvalOptions::default()
    };
    let policies = [ExpertPolicy::Exact, ExpertPolicy::TopK(2)];
    let report = eval_policies(&gpu, tok, &data, &policies, &opts, &mut |_| {}).unwrap();
    assert_eq!(report.windows, 2);
    assert!(report.text_tokens > 10_000);
    assert_same_as_reference("exact control", &report.rows[0].text, &report.reference);
    let reference_qa = report.reference_qa.as_ref().expect("QA ran");
    assert_eq!(reference_qa.answers.len(), 3);
    let control = report.rows[0].qa.as_ref().unwrap();
    assert_eq!(control, reference_qa, "greedy answers repeat exactly");
    assert_eq!(control.changed_from(reference_qa), 0);
    let topk = &report.rows[1];
    assert!(topk.text.mean_kl() > 0.0);
    assert_eq!(topk.qa.as_ref().unwrap().answers.len(), 3);
}

/// `topk=N` is a per-token policy, so a window's scores must not depend on
/// which other windows share its decode steps. Ignored until the engine bug
/// it found is fixed: a token's padded slots (its top-1 again, weight 0)
/// give that expert more than T grouped rows, and moe_matmul_nt_wq's grid
/// (ceil(T / TILE_T) token tiles per expert) never computes the rows past
/// T, so later tokens of the batch combine stale expert outputs.
#[test]
fn per_token_policy_is_batch_invariant() {
    let Some(gpu) = fixture_gpu("mixtral") else { return };
    let wins = windows(4, 16, gpu.config.vocab_size as u32);
    let policies = [ExpertPolicy::TopK(1)];
    let (_, batched) = score_text(&gpu, &wins, 4, 1, &policies, &mut |_| {}).unwrap();
    let (_, single) = score_text(&gpu, &wins, 1, 1, &policies, &mut |_| {}).unwrap();
    for (w, (a, b)) in batched[0].window_nll.iter().zip(&single[0].window_nll).enumerate() {
        assert!((a - b).abs() < 1e-6 * b.abs(), "window {w}: NLL {a} at B=4, {b} at B=1");
    }
}
