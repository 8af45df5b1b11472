//! Accuracy evaluation of the expert-selection policies (`lynx eval`).
//!
//! A selection policy (`selection::ExpertPolicy`) trades accuracy for fewer
//! distinct experts per decode step. This module measures what it costs,
//! against exact routing, on the same model, tokens and batch schedule:
//!
//! - **Text** (perplexity, top-1 agreement, KL). B windows of W tokens of
//!   held-out text run together as one batch. Each window's first `prefix`
//!   tokens are prefilled (with exact routing, as every prefill is); the rest
//!   are fed one token per step (teacher forcing), so that every later step
//!   is a decode step of B tokens, the only kind a policy applies to. Every
//!   decode step's next-token distribution is scored against the true next
//!   token (perplexity) and against the distribution of a reference run with
//!   exact routing under the identical schedule (top-1 agreement and
//!   KL(exact ‖ policy)). Only predictions made by decode steps are scored:
//!   the prefill's prediction is the same under every policy and would only
//!   dilute the differences. Scored tokens per window: W − prefix − 1.
//! - **Question answering**. Every question of a small set with known
//!   answers is put in the model's chat template and answered greedily, all
//!   questions in one batch (`generate_batch`), as a serving loop runs them:
//!   an exact-routed prefill, then batched decode steps under the policy.
//!   The first answer token therefore comes from the prefill and is the same
//!   under every policy; the policy acts from the second token on. A question
//!   is answered correctly when [`answer_matches`] accepts the text.
//!
//! The reference run of exact routing is separate from an `exact` entry in
//! the policy list. Such an entry is a second, independent run: a control.
//! On a deterministic backend it shows exactly agreement 1 and KL 0, which
//! shows that the other rows' differences come from their policies, not from
//! run-to-run noise; anything else is the engine's noise floor.
//!
//! The runs proceed in lockstep, one decode step of each run after the other,
//! so that only one step's distributions are held at a time (a whole run's
//! would be B · W · V values). The KV caches of (1 + policies) · B sequences
//! of W tokens live together instead, which is far less.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use lynx::error::{Error, Result};
use lynx::generate::{GenerateOptions, StepOutput, StepSpec, generate_batch};
use lynx::gpu::{GpuModel, GpuSequence};
use lynx::metrics::StepMetrics;
use lynx::model::Logits;
use lynx::selection::ExpertPolicy;
use lynx::tokenizer::{ChatMessage, Tokenizer};

/// The held-out text, `models/eval/heldout.txt` (provenance in
/// `models/eval/README.md`), built into the library.
pub const HELDOUT_TEXT: &str = crate::bench::BENCH_TEXT;

/// The question-answering set, `models/eval/qa.jsonl`, built into the
/// library so that `lynx eval` works outside the repository.
pub const QA_JSONL: &str = include_str!("../../models/eval/qa.jsonl");

/// One question with its known answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QaItem {
    pub id: Option<u64>,
    pub question: String,
    /// The canonical answer.
    pub answer: String,
    /// Other accepted spellings (e.g. "four" for "4").
    pub aliases: Vec<String>,
}

impl QaItem {
    /// Every accepted answer, the canonical one first.
    pub fn accepted(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.answer.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// Whether `generated` answers this question (see [`answer_matches`]).
    pub fn is_answered_by(&self, generated: &str) -> bool {
        answer_matches(generated, self.accepted())
    }
}

/// One line of the JSONL file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QaLine {
    #[serde(default)]
    id: Option<u64>,
    question: String,
    answer: String,
    #[serde(default)]
    aliases: Vec<String>,
}

/// Parses a QA set: one JSON object per line, `{"id": 1, "question": "...",
/// "answer": "...", "aliases": ["..."]}` (`id` and `aliases` optional);
/// blank lines are skipped. `origin` names the file in errors.
pub fn parse_qa(jsonl: &str, origin: &Path) -> Result<Vec<QaItem>> {
    let bad = |line: usize, reason: String| Error::Format {
        path: origin.to_path_buf(),
        format: "QA JSONL",
        reason: format!("line {line}: {reason}"),
    };
    let mut items = Vec::new();
    for (i, line) in jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: QaLine = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        if q.question.trim().is_empty() {
            return Err(bad(i + 1, "the question is empty".into()));
        }
        // An answer with no letters or digits would normalise to nothing and
        // match every response.
        if let Some(a) = std::iter::once(&q.answer)
            .chain(&q.aliases)
            .find(|a| normalize_answer(a).is_empty())
        {
            return Err(bad(i + 1, format!("answer `{a}` has no letters or digits")));
        }
        items.push(QaItem {
            id: q.id,
            question: q.question,
            answer: q.answer,
            aliases: q.aliases,
        });
    }
    Ok(items)
}

/// Lowercases `s` and turns every run of characters that are not letters
/// or digits into one space, trimmed at both ends: "The capital is Paris."
/// becomes "the capital is paris", "twenty-four" becomes "twenty four".
pub fn normalize_answer(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// The exact-match rule: `generated` answers the question when, after both
/// are normalised ([`normalize_answer`]), one accepted answer occurs in the
/// generated text as a run of whole words. "Paris." and "The capital of
/// France is Paris" match `Paris`; "Parisian" does not, and neither does
/// "14" for `4`. The rule is lenient about wording, not about content: a
/// response that names several candidates counts if one is right.
pub fn answer_matches<'a>(generated: &str, accepted: impl IntoIterator<Item = &'a str>) -> bool {
    let text = format!(" {} ", normalize_answer(generated));
    accepted.into_iter().any(|a| {
        let a = normalize_answer(a);
        !a.is_empty() && text.contains(&format!(" {a} "))
    })
}

/// The evaluation inputs: held-out text and questions.
#[derive(Clone, Debug)]
pub struct EvalData {
    pub text: String,
    pub questions: Vec<QaItem>,
}

impl EvalData {
    /// The built-in data: `models/eval/heldout.txt` and `models/eval/qa.jsonl`.
    pub fn builtin() -> Result<EvalData> {
        Ok(EvalData {
            text: HELDOUT_TEXT.to_string(),
            questions: parse_qa(QA_JSONL, Path::new("models/eval/qa.jsonl"))?,
        })
    }

    /// Reads the text and the questions from files, using the built-in copy
    /// of each one that is not given.
    pub fn load(text: Option<&Path>, questions: Option<&Path>) -> Result<EvalData> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p, e));
        let text = match text {
            Some(p) => read(p)?,
            None => HELDOUT_TEXT.to_string(),
        };
        let questions = match questions {
            Some(p) => parse_qa(&read(p)?, p)?,
            None => parse_qa(QA_JSONL, Path::new("models/eval/qa.jsonl"))?,
        };
        Ok(EvalData { text, questions })
    }
}

/// How to run the evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalOptions {
    /// Sequences per decode step (B). Batch-aware policies depend on it:
    /// with B = 1 `lynx` routes exactly.
    pub batch: usize,
    /// Tokens per text window (W).
    pub window: usize,
    /// Tokens of each window that are prefilled before teacher forcing.
    pub prefix: usize,
    /// Batches of windows; the text part scores `rounds · batch` windows.
    pub rounds: usize,
    /// Whether to run the question-answering part.
    pub qa: bool,
    /// The most tokens generated per answer.
    pub qa_max_new_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch: 16,
            window: 128,
            prefix: 1,
            rounds: 1,
            qa: true,
            qa_max_new_tokens: 16,
        }
    }
}

impl EvalOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::InvalidArgument(s));
        if self.batch == 0 || self.rounds == 0 {
            return bad("eval: the batch size and the number of rounds must be at least 1".into());
        }
        if self.prefix == 0 {
            // A decode step needs a cached token in every sequence.
            return bad("eval: the prefix must be at least 1 token".into());
        }
        if self.window < self.prefix + 2 {
            return bad(format!(
                "eval: a window of {} tokens leaves nothing to score after a prefix of {} (it needs at least prefix + 2)",
                self.window, self.prefix
            ));
        }
        if self.qa && self.qa_max_new_tokens == 0 {
            return bad("eval: answers need at least 1 new token".into());
        }
        Ok(())
    }
}

/// Where a long evaluation is, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// `"text"` or `"qa"`.
    pub phase: &'static str,
    pub done: usize,
    pub total: usize,
}

/// One run's scores on the text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextScores {
    /// Next-token predictions scored (made by decode steps).
    pub tokens: usize,
    /// Sum of −ln p(true next token), in nats.
    pub nll: f64,
    /// Predictions whose most likely token is the reference run's.
    pub top1_agree: usize,
    /// Predictions whose most likely token is the true next token.
    pub top1_correct: usize,
    /// KL(exact ‖ this run) of every prediction, in nats, window by window.
    pub kl: Vec<f64>,
    /// Per window (in text order): the sum of −ln p over its predictions.
    pub window_nll: Vec<f64>,
    /// Per window: the sum of its predictions' KL.
    pub window_kl: Vec<f64>,
    /// Decode steps whose routing metrics were read back, and the sums over
    /// them of the mean (over MoE layers) distinct experts the exact routing
    /// would load and the run did load. Zero steps for dense models.
    pub metric_steps: usize,
    pub distinct_exact_sum: f64,
    pub distinct_selected_sum: f64,
}

impl TextScores {
    /// exp(mean −ln p) over the scored predictions.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    /// Fraction of predictions whose argmax is the exact run's argmax.
    pub fn agreement(&self) -> f64 {
        self.top1_agree as f64 / self.tokens.max(1) as f64
    }

    /// Fraction of predictions whose argmax is the true next token.
    pub fn accuracy(&self) -> f64 {
        self.top1_correct as f64 / self.tokens.max(1) as f64
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl.iter().sum::<f64>() / self.kl.len().max(1) as f64
    }

    /// The `q`-quantile (nearest rank) of the per-prediction KL; 0 when
    /// nothing was scored.
    pub fn kl_quantile(&self, q: f64) -> f64 {
        if self.kl.is_empty() {
            return 0.0;
        }
        let mut v = self.kl.clone();
        v.sort_by(f64::total_cmp);
        let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn max_kl(&self) -> f64 {
        self.kl.iter().copied().fold(0.0, f64::max)
    }

    /// Mean distinct experts per MoE layer per decode step: what the exact
    /// routing would load and what this run loaded; `None` without metrics.
    pub fn distinct_experts(&self) -> Option<(f64, f64)> {
        (self.metric_steps > 0).then(|| {
            let n = self.metric_steps as f64;
            (self.distinct_exact_sum / n, self.distinct_selected_sum / n)
        })
    }

    /// The window (index in text order) with the largest mean KL, and that
    /// mean: where the policy hurts most.
    pub fn worst_window(&self) -> Option<(usize, f64)> {
        let per = self.tokens / self.window_kl.len().max(1);
        self.window_kl
            .iter()
            .enumerate()
            .map(|(i, &s)| (i, s / per.max(1) as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// One run's answers to the questions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QaScores {
    /// The generated text of each question, in order.
    pub answers: Vec<String>,
    /// Whether each answer is correct.
    pub correct: Vec<bool>,
}

impl QaScores {
    pub fn correct_count(&self) -> usize {
        self.correct.iter().filter(|&&c| c).count()
    }

    pub fn accuracy(&self) -> f64 {
        self.correct_count() as f64 / self.correct.len().max(1) as f64
    }

    /// Questions whose generated text differs from `other`'s.
    pub fn changed_from(&self, other: &QaScores) -> usize {
        self.answers.iter().zip(&other.answers).filter(|(a, b)| a != b).count()
    }

    /// Questions `other` answered correctly and this run did not, and the
    /// reverse.
    pub fn flips_from(&self, other: &QaScores) -> (usize, usize) {
        let pairs = self.correct.iter().zip(&other.correct);
        let lost = pairs.clone().filter(|&(&me, &them)| them && !me).count();
        let gained = pairs.filter(|&(&me, &them)| me && !them).count();
        (lost, gained)
    }
}

/// One policy's results.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReport {
    pub policy: ExpertPolicy,
    pub text: TextScores,
    pub qa: Option<QaScores>,
}

/// Everything `eval_policies` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub options: EvalOptions,
    /// Tokens in the held-out text, and the windows scored.
    pub text_tokens: usize,
    pub windows: usize,
    /// Where each window starts in the tokenised text (its first token's
    /// index), in text order: the window indices of [`TextScores`].
    pub window_starts: Vec<usize>,
    /// The reference run with exact routing, which agreement and KL compare
    /// against, and its answers.
    pub reference: TextScores,
    pub reference_qa: Option<QaScores>,
    pub rows: Vec<PolicyReport>,
}

/// `n` windows of `w` tokens from `ids`, evenly spaced over the whole text
/// (so that every part of it is represented) and never overlapping.
pub fn text_windows(ids: &[u32], n: usize, w: usize) -> Result<Vec<Vec<u32>>> {
    Ok(window_starts(ids.len(), n, w)?
        .into_iter()
        .map(|s| ids[s..s + w].to_vec())
        .collect())
}

/// The start of each window that [`text_windows`] cuts from `len` tokens.
pub fn window_starts(len: usize, n: usize, w: usize) -> Result<Vec<usize>> {
    if n == 0 || w == 0 {
        return Err(Error::InvalidArgument(
            "eval: need at least one window of at least one token".into(),
        ));
    }
    if len < n * w {
        return Err(Error::InvalidArgument(format!(
            "eval: the text has {len} tokens, too few for {n} windows of {w}"
        )));
    }
    let stride = len / n;
    Ok((0..n).map(|i| i * stride).collect())
}

/// Checks every policy against the model before anything runs, so that a
/// bad policy fails at once rather than after minutes of work.
fn check_policies(gpu: &GpuModel, policies: &[ExpertPolicy]) -> Result<()> {
    for p in policies {
        p.resolve_for(&gpu.config)?;
    }
    Ok(())
}

/// Runs one forward step `spec` for `seqs`, feeding `tokens[i]` to
/// sequence `i`; its output has each sequence's last logits row.
fn forward_step(gpu: &GpuModel, seqs: &mut [GpuSequence], tokens: &[&[u32]], spec: StepSpec) -> Result<StepOutput> {
    let mut batch: Vec<(&mut GpuSequence, &[u32])> = seqs.iter_mut().zip(tokens.iter().copied()).collect();
    let out = gpu.run_blocking(&mut batch, spec)?;
    let rows = &out.logits;
    if rows.len() != tokens.len() || rows.iter().any(|r| r.len() != gpu.config.vocab_size) {
        return Err(Error::Gpu(format!(
            "eval: the engine returned {} logits rows for {} sequences",
            rows.len(),
            tokens.len()
        )));
    }
    Ok(out)
}

/// Writes the log-softmax of `logits` into `out` (in f64, so that sums over
/// a large vocabulary keep their precision) and returns the argmax (the
/// first one on ties).
fn log_softmax(logits: &[f32], out: &mut [f64]) -> Result<usize> {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_finite() {
            return Err(Error::Gpu(format!("eval: logit {i} is {x}")));
        }
        if x > logits[best] {
            best = i;
        }
    }
    let max = logits[best] as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    for (o, &x) in out.iter_mut().zip(logits) {
        *o = x as f64 - lse;
    }
    Ok(best)
}

/// Adds the decode steps' routing metrics that arrived since the last call
/// to `scores`. Every step of the schedule after the prefill must be a
/// decode step of `batch` tokens; anything else means the policy was not
/// applied as intended, and the numbers would be wrong.
fn take_metrics(metrics: &[Arc<StepMetrics>], batch: usize, scores: Option<&mut TextScores>) -> Result<()> {
    let mut scores = scores;
    if metrics.is_empty() {
        return Err(Error::Gpu("eval: the decode step returned no metrics".into()));
    }
    for m in metrics {
        if !m.decode || m.tokens != batch {
            return Err(Error::Gpu(format!(
                "eval: expected a decode step of {batch} tokens, the engine ran a {} step of {} tokens",
                if m.decode { "decode" } else { "prefill" },
                m.tokens
            )));
        }
        if let Some(s) = scores.as_deref_mut() {
            s.metric_steps += 1;
            s.distinct_exact_sum += m.mean_distinct_exact();
            s.distinct_selected_sum += m.mean_distinct_selected();
        }
    }
    Ok(())
}

/// Scores `windows` (all of one length) under each policy, in batches of
/// `batch` windows: see the module documentation for the schedule. Returns
/// the reference run's scores (exact routing) and one [`TextScores`] per
/// policy. `windows.len()` must be a multiple of `batch`; batch `r` of `n`
/// takes windows `r, r + n, r + 2n, ...`, so that each batch spans the text.
pub fn score_text(
    gpu: &GpuModel,
    windows: &[Vec<u32>],
    batch: usize,
    prefix: usize,
    policies: &[ExpertPolicy],
    progress: &mut dyn FnMut(Progress),
) -> Result<(TextScores, Vec<TextScores>)> {
    let w = windows.first().map_or(0, Vec::len);
    if batch == 0 || windows.is_empty() || !windows.len().is_multiple_of(batch) {
        return Err(Error::InvalidArgument(format!(
            "eval: {} windows do not make whole batches of {batch}",
            windows.len()
        )));
    }
    if windows.iter().any(|x| x.len() != w) {
        return Err(Error::InvalidArgument("eval: the windows differ in length".into()));
    }
    if prefix == 0 || w < prefix + 2 {
        return Err(Error::InvalidArgument(format!(
            "eval: windows of {w} tokens with a prefix of {prefix} leave nothing to score"
        )));
    }
    if w > gpu.config.max_position_embeddings {
        return Err(Error::ContextOverflow {
            requested: w,
            limit: gpu.config.max_position_embeddings,
        });
    }
    if batch > gpu.max_step_tokens {
        // The engine would split each decode step, and the policy would see
        // smaller batches than asked for.
        return Err(Error::InvalidArgument(format!(
            "eval: a batch of {batch} exceeds the engine's {} tokens per step",
            gpu.max_step_tokens
        )));
    }
    let vocab = gpu.config.vocab_size;
    if let Some(&id) = windows.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(Error::TokenOutOfRange { id, vocab });
    }
    check_policies(gpu, policies)?;

    // Run 0 is the reference; run i + 1 is policies[i].
    let runs: Vec<ExpertPolicy> = std::iter::once(ExpertPolicy::Exact)
        .chain(policies.iter().copied())
        .collect();
    let rounds = windows.len() / batch;
    let mut scores = vec![
        TextScores {
            window_nll: vec![0.0; windows.len()],
            window_kl: vec![0.0; windows.len()],
            ..TextScores::default()
        };
        runs.len()
    ];
    let total = rounds * runs.len() * (w - prefix);
    let mut done = 0;
    progress(Progress {
        phase: "text",
        done,
        total,
    });

    // Buffers for one step: the reference's log-probabilities, probabilities
    // and argmax per sequence, and one row of a policy's log-probabilities.
    let mut ref_lp = vec![0f64; batch * vocab];
    let mut ref_p = vec![0f64; batch * vocab];
    let mut ref_top = vec![0usize; batch];
    let mut lp = vec![0f64; vocab];

    for r in 0..rounds {
        let idx: Vec<usize> = (0..batch).map(|i| r + i * rounds).collect();
        let mut seqs: Vec<Vec<GpuSequence>> = runs
            .iter()
            .map(|_| (0..batch).map(|_| gpu.new_sequence()).collect())
            .collect();
        for run_seqs in &mut seqs {
            // Prefill steps route exactly whatever the policy.
            let prompts: Vec<&[u32]> = idx.iter().map(|&i| &windows[i][..prefix]).collect();
            forward_step(gpu, run_seqs, &prompts, StepSpec::prefill(Logits::Last))?;
            done += 1;
            progress(Progress {
                phase: "text",
                done,
                total,
            });
        }
        for t in prefix..w - 1 {
            let feed: Vec<&[u32]> = idx.iter().map(|&i| &windows[i][t..t + 1]).collect();
            for (run, &policy) in runs.iter().enumerate() {
                let out = forward_step(gpu, &mut seqs[run], &feed, StepSpec::decode(policy).with_metrics())?;
                take_metrics(&out.metrics, batch, Some(&mut scores[run]))?;
                let rows = out.logits;
                let s = &mut scores[run];
                for (b, row) in rows.iter().enumerate() {
                    let window = idx[b];
                    let target = windows[window][t + 1] as usize;
                    let (nll, kl) = if run == 0 {
                        let out = &mut ref_lp[b * vocab..(b + 1) * vocab];
                        let top = log_softmax(row, out)?;
                        ref_top[b] = top;
                        for (p, &l) in ref_p[b * vocab..(b + 1) * vocab].iter_mut().zip(out.iter()) {
                            *p = l.exp();
                        }
                        s.top1_agree += 1;
                        if top == target {
                            s.top1_correct += 1;
                        }
                        (-out[target], 0.0)
                    } else {
                        let top = log_softmax(row, &mut lp)?;
                        if top == ref_top[b] {
                            s.top1_agree += 1;
                        }
                        if top == target {
                            s.top1_correct += 1;
                        }
                        let range = b * vocab..(b + 1) * vocab;
                        let sum: f64 = ref_p[range.clone()]
                            .iter()
                            .zip(&ref_lp[range])
                            .zip(&lp)
                            .map(|((p, rl), l)| p * (rl - l))
                            .sum();
                        // KL is never negative; rounding can make a near-zero
                        // sum come out a hair below zero.
                        (-lp[target], sum.max(0.0))
                    };
                    s.tokens += 1;
                    s.nll += nll;
                    s.kl.push(kl);
                    s.window_nll[window] += nll;
                    s.window_kl[window] += kl;
                }
                done += 1;
                progress(Progress {
                    phase: "text",
                    done,
                    total,
                });
            }
        }
    }
    let mut scores = scores.into_iter();
    let reference = scores
        .next()
        .ok_or_else(|| Error::InvalidArgument("eval: no reference run".into()))?;
    Ok((reference, scores.collect()))
}

/// Each question as a token prompt: one user message in the model's chat
/// template (plain ChatML for a model without one), with the generation
/// prompt, tokenised without adding BOS/EOS again.
pub fn qa_prompts(tok: &Tokenizer, questions: &[QaItem]) -> Result<Vec<Vec<u32>>> {
    questions
        .iter()
        .map(|q| tok.encode_chat(&[ChatMessage::user(q.question.as_str())]))
        .collect()
}

/// Answers every question under `policy`, greedily and all in one batch,
/// and scores the answers.
pub fn run_qa(
    gpu: &GpuModel,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    questions: &[QaItem],
    policy: ExpertPolicy,
    max_new_tokens: usize,
) -> Result<QaScores> {
    if prompts.len() != questions.len() {
        return Err(Error::InvalidArgument(format!(
            "eval: {} prompts for {} questions",
            prompts.len(),
            questions.len()
        )));
    }
    if prompts.len() > gpu.max_step_tokens {
        return Err(Error::InvalidArgument(format!(
            "eval: {} questions exceed the engine's {} tokens per step, so their decode steps would be split",
            prompts.len(),
            gpu.max_step_tokens
        )));
    }
    check_policies(gpu, &[policy])?;
    let opts = GenerateOptions {
        max_new_tokens,
        policy,
        // The default sampling is greedy: answers are deterministic, and a
        // change in an answer is the policy's doing.
        ..GenerateOptions::default()
    };
    let generations = generate_batch(gpu, tok, prompts, &opts, |_, _| {})?;
    let answers: Vec<String> = generations.into_iter().map(|g| g.text).collect();
    let correct = answers
        .iter()
        .zip(questions)
        .map(|(a, q)| q.is_answered_by(a))
        .collect();
    Ok(QaScores { answers, correct })
}

/// Runs the whole evaluation: the text part over `opts.rounds` batches of
/// `opts.batch` windows of `data.text`, and (when `opts.qa` and there are
/// questions) the question-answering part, for the reference exact run and
/// each policy.
pub fn eval_policies(
    gpu: &GpuModel,
    tok: &Tokenizer,
    data: &EvalData,
    policies: &[ExpertPolicy],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<EvalReport> {
    opts.validate()?;
    // Check the policies before tokenising and running anything.
    check_policies(gpu, policies)?;
    let ids = tok.encode(&data.text, false)?;
    let starts = window_starts(ids.len(), opts.batch * opts.rounds, opts.window)?;
    let windows: Vec<Vec<u32>> = starts.iter().map(|&s| ids[s..s + opts.window].to_vec()).collect();
    let (reference, text) = score_text(gpu, &windows, opts.batch, opts.prefix, policies, progress)?;

    let mut reference_qa = None;
    let mut qa: Vec<Option<QaScores>> = vec![None; policies.len()];
    if opts.qa && !data.questions.is_empty() {
        let prompts = qa_prompts(tok, &data.questions)?;
        let total = policies.len() + 1;
        let run = |p: ExpertPolicy| run_qa(gpu, tok, &prompts, &data.questions, p, opts.qa_max_new_tokens);
        progress(Progress {
            phase: "qa",
            done: 0,
            total,
        });
        reference_qa = Some(run(ExpertPolicy::Exact)?);
        for (i, &p) in policies.iter().enumerate() {
            progress(Progress {
                phase: "qa",
                done: i + 1,
                total,
            });
            qa[i] = Some(run(p)?);
        }
        progress(Progress {
            phase: "qa",
            done: total,
            total,
        });
    }
    Ok(EvalReport {
        options: *opts,
        text_tokens: ids.len(),
        windows: windows.len(),
        window_starts: starts,
        reference,
        reference_qa,
        rows: policies
            .iter()
            .zip(text)
            .zip(qa)
            .map(|((&policy, text), qa)| PolicyReport { policy, text, qa })
            .collect(),
    })
}

/// Parses a comma-separated policy list such as `exact,lynx,oea,topk=4`.
/// A `lynx:alpha=A,beta=B,threshold=T` entry keeps its own commas: a piece
/// that starts with `beta=` or `threshold=` continues the entry before it.
pub fn parse_policy_list(s: &str) -> Result<Vec<ExpertPolicy>> {
    let mut entries: Vec<String> = Vec::new();
    for piece in s.split(',').map(str::trim) {
        let continues = piece.starts_with("beta=") || piece.starts_with("threshold=") || piece.starts_with("alpha=");
        match entries.last_mut() {
            Some(last) if continues && last.starts_with("lynx:") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => entries.push(piece.to_string()),
        }
    }
    if entries.iter().any(String::is_empty) {
        return Err(Error::InvalidArgument(format!(
            "expert policy list `{s}` has an empty entry"
        )));
    }
    entries.iter().map(|e| e.parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize_answer("  The capital is PARIS.  "), "the capital is paris");
        assert_eq!(normalize_answer("twenty-four"), "twenty four");
        assert_eq!(normalize_answer("\"Down\"!"), "down");
        assert_eq!(normalize_answer("CO₂ / CO2"), "co₂ co2");
        assert_eq!(normalize_answer("?!"), "");
    }

    #[test]
    fn whole_word_matching() {
        let m = |text: &str, answer: &str| answer_matches(text, [answer]);
        assert!(m("Paris.", "paris"));
        assert!(m("The capital of France is Paris", "Paris"));
        assert!(!m("Parisian", "Paris"));
        assert!(!m("14", "4"));
        assert!(m("2 + 2 = 4.", "4"));
        assert!(m("The answer is twenty four", "twenty-four"));
        assert!(m("Leonardo da Vinci painted it.", "da Vinci"));
        assert!(!m("", "Paris"));
    }

    #[test]
    fn builtin_qa_set_parses() {
        let items = parse_qa(QA_JSONL, Path::new("qa.jsonl")).unwrap();
        assert!(items.len() >= 40, "{} questions", items.len());
        let item = &items[0];
        assert!(item.is_answered_by(&format!("It is {}.", item.answer)));
        // Every question has an answer that its own text does not already
        // contain, or echoing the question would count as answering it.
        for q in &items {
            assert!(
                !q.is_answered_by(&q.question),
                "question {:?} contains its answer",
                q.id
            );
        }
    }

    #[test]
    fn bad_qa_lines_name_the_line() {
        let err = parse_qa(
            "{\"question\": \"q\", \"answer\": \"a\"}\n\n{\"question\": \"q\"}\n",
            Path::new("x.jsonl"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x.jsonl") && err.contains("line 3"), "{err}");
        let err = parse_qa("{\"question\": \"q\", \"answer\": \"...\"}", Path::new("x.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no letters or digits"), "{err}");
    }

    #[test]
    fn policy_lists() {
        let p = parse_policy_list("exact, lynx,oea=2,topk=4").unwrap();
        assert_eq!(
            p,
            [
                ExpertPolicy::Exact,
                ExpertPolicy::Lynx(None),
                ExpertPolicy::Oea { k0: 2 },
                ExpertPolicy::TopK(4)
            ]
        );
        let p = parse_policy_list("exact,lynx:alpha=1,beta=2,threshold=0,topk=1").unwrap();
        assert_eq!(p.len(), 3);
        assert!(matches!(p[1], ExpertPolicy::Lynx(Some(_))));
        assert!(parse_policy_list("exact,,lynx").is_err());
        assert!(parse_policy_list("exact,fast").is_err());
    }

    #[test]
    fn windows_are_spread_and_disjoint() {
        let ids: Vec<u32> = (0..100).collect();
        let w = text_windows(&ids, 4, 10).unwrap();
        assert_eq!(w.iter().map(|x| x[0]).collect::<Vec<_>>(), [0, 25, 50, 75]);
        assert!(text_windows(&ids, 11, 10).is_err());
    }

    #[test]
    fn log_softmax_and_quantiles() {
        let mut out = vec![0.0; 3];
        let top = log_softmax(&[1.0, 3.0, 3.0], &mut out).unwrap();
        assert_eq!(top, 1, "ties go to the first");
        let total: f64 = out.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_softmax(&[0.0, f32::NAN], &mut out).is_err());
        let s = TextScores {
            kl: vec![0.4, 0.1, 0.3, 0.2],
            tokens: 4,
            ..TextScores::default()
        };
        assert_eq!(s.kl_quantile(0.5), 0.2);
        assert_eq!(s.kl_quantile(1.0), 0.4);
        assert_eq!(s.max_kl(), 0.4);
        assert!((s.mean_kl() - 0.25).abs() < 1e-12);
    }
}
