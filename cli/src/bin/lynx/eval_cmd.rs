//! `lynx eval`: what each expert-selection policy costs in accuracy, against
//! exact routing, on held-out text (perplexity, top-1 agreement, KL) and on
//! a small question-answering set (exact match). The measurement itself is
//! `lynx_cli::eval`; this file parses the flags and prints the tables.

use std::io::{self, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use lynx::selection::ExpertPolicy;
use lynx_cli::eval::{EvalData, EvalOptions, EvalReport, PolicyReport, Progress, eval_policies, parse_policy_list};

#[derive(Args)]
pub struct EvalArgs {
    /// A Hugging Face checkpoint directory or a .gguf file (an MoE model)
    /// [default: the default model].
    pub model: Option<PathBuf>,
    /// Policies to compare with exact routing, comma-separated: exact, lynx,
    /// oea, oea=K0, topk=N, lynx:alpha=A,beta=B,threshold=T. An `exact`
    /// entry is a control: a second exact run, which must match the
    /// reference [default: exact,lynx,oea,topk=K/2].
    #[arg(long, value_name = "LIST")]
    pub experts: Option<String>,
    /// Sequences per decode step (B) in the text part. Batch-aware policies
    /// depend on it: at B=1, lynx routes exactly.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens per window of held-out text (W).
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Tokens of each window that are prefilled (with exact routing) before
    /// the rest is fed one token per decode step.
    #[arg(long, default_value_t = 1)]
    pub prefix: usize,
    /// Batches of windows to score; more give steadier numbers.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Held-out text file [default: the built-in copy of
    /// models/eval/heldout.txt].
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Question-answering set, JSON lines with `question`, `answer` and
    /// optional `aliases` [default: the built-in copy of
    /// models/eval/qa.jsonl].
    #[arg(long, value_name = "FILE")]
    pub questions: Option<PathBuf>,
    /// The most tokens generated per answer.
    #[arg(long, default_value_t = 16)]
    pub max_answer_tokens: usize,
    /// Skip the question-answering part.
    #[arg(long)]
    pub no_qa: bool,
    /// Also print every question with each run's answer.
    #[arg(long)]
    pub show_answers: bool,
}

impl EvalArgs {
    fn options(&self) -> EvalOptions {
        EvalOptions {
            batch: self.batch,
            window: self.window,
            prefix: self.prefix,
            rounds: self.rounds,
            qa: !self.no_qa,
            qa_max_new_tokens: self.max_answer_tokens,
        }
    }
}

/// The policies compared when `--experts` is not given: both batch-aware
/// policies at their default settings, and the static top-N that loads as
/// many experts per token as OEA keeps for sure, as a baseline.
pub fn default_policies(top_k: usize) -> Vec<ExpertPolicy> {
    vec![
        ExpertPolicy::Exact,
        ExpertPolicy::Lynx(None),
        ExpertPolicy::Oea { k0: 0 },
        ExpertPolicy::TopK((top_k / 2).max(1)),
    ]
}

pub fn eval_cmd(args: &EvalArgs) -> anyhow::Result<()> {
    // Everything that can be checked without the model is checked first,
    // so that a typo fails before a slow load.
    let opts = args.options();
    opts.validate()?;
    let requested = match &args.experts {
        Some(list) => Some(parse_policy_list(list).context("invalid --experts")?),
        None => None,
    };
    let data =
        EvalData::load(args.text.as_deref(), args.questions.as_deref()).context("failed to read the eval data")?;

    let path = match &args.model {
        Some(p) => p.clone(),
        None => lynx::loader::default_model_path().context("no MODEL given, and no default model could be found")?,
    };
    let lm = super::load_model(&path)?;
    let tok = super::require_tokenizer(&lm, "eval")?;
    let c = &lm.model.config;
    let Some(moe) = &c.moe else {
        bail!(
            "{} is a dense model; `lynx eval` compares expert-selection policies, which need an MoE model",
            lm.path.display()
        );
    };
    let policies = requested.unwrap_or_else(|| default_policies(moe.top_k));
    let gpu = super::upload_to_gpu(&lm, super::open_gpu_for("eval")?)?;

    let bar = io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(1);
        if let Ok(style) = ProgressStyle::with_template("{msg:<24} {bar:30} {pos}/{len} ({elapsed}, ~{eta} left)") {
            pb.set_style(style);
        }
        pb
    });
    let mut phase = "";
    let mut on_progress = |p: Progress| {
        let msg = match p.phase {
            "text" => "text: decode steps",
            _ => "questions: policy runs",
        };
        match &bar {
            Some(pb) => {
                pb.set_message(msg);
                pb.set_length(p.total as u64);
                pb.set_position(p.done as u64);
            }
            // Without a terminal, one line per phase is enough for a log.
            None if p.phase != phase => eprintln!("[eval: {msg}, {} to run]", p.total),
            None => {}
        }
        phase = p.phase;
    };
    let report = eval_policies(&gpu, tok, &data, &policies, &opts, &mut on_progress).context("evaluation failed")?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }

    println!(
        "model:     {} ({}, {} layers, E={} K={})",
        lm.path.display(),
        c.arch.name(),
        c.num_layers,
        moe.num_experts,
        moe.top_k
    );
    println!("adapter:   {}", gpu.ctx.adapter_report());
    let text_name = args
        .text
        .as_ref()
        .map_or("models/eval/heldout.txt (built in)".to_string(), |p| {
            p.display().to_string()
        });
    println!(
        "text:      {} windows x {} tokens of {text_name} ({} tokens); {} prefilled, then decode steps of B={} \
         sequences; {} scored predictions per run",
        report.windows, opts.window, report.text_tokens, opts.prefix, opts.batch, report.reference.tokens
    );
    if let Some(qa) = &report.reference_qa {
        let qa_name = args
            .questions
            .as_ref()
            .map_or("models/eval/qa.jsonl (built in)".to_string(), |p| {
                p.display().to_string()
            });
        println!(
            "questions: {} from {qa_name}, all in one batch, chat template, greedy, <= {} tokens per answer",
            qa.answers.len(),
            opts.qa_max_new_tokens
        );
    }
    println!();
    print_table(&report);
    println!();
    print_notes(&report);
    print_resolved(&report, moe.num_experts, moe.top_k);
    if args.show_answers
        && let Some(reference) = &report.reference_qa
    {
        println!();
        print_answers(&data, &report, reference);
    }
    Ok(())
}

fn print_table(report: &EvalReport) {
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>14} {:>14} {:>10} {:>9}",
        "policy",
        "ppl",
        "Δppl",
        "top-1 agr",
        "mean KL",
        "p95 KL",
        "max KL",
        "experts/layer",
        "QA exact-match",
        "QA changed",
        "QA -/+"
    );
    let base = report.reference.ppl();
    let reference = PolicyReport {
        policy: ExpertPolicy::Exact,
        text: report.reference.clone(),
        qa: report.reference_qa.clone(),
    };
    print_row("ref: exact", &reference, base, None);
    for row in &report.rows {
        let reference_qa = report.reference_qa.as_ref();
        print_row(&row.policy.to_string(), row, base, Some(reference_qa));
    }
}

/// One table row. `reference_qa` is `None` for the reference run itself,
/// whose comparison columns would only compare it with itself, and
/// `Some(None)` when no questions were run.
fn print_row(name: &str, row: &PolicyReport, base_ppl: f64, reference_qa: Option<Option<&lynx_cli::eval::QaScores>>) {
    let t = &row.text;
    let is_ref = reference_qa.is_none();
    let reference_qa = reference_qa.flatten();
    let dash = || "-".to_string();
    let compare = |s: String| if is_ref { dash() } else { s };
    let experts = t
        .distinct_experts()
        .map_or(dash(), |(want, loaded)| format!("{loaded:.2} of {want:.2}"));
    let (qa, changed, flips) = match &row.qa {
        Some(q) => (
            format!(
                "{}/{} {:>5.1}%",
                q.correct_count(),
                q.correct.len(),
                100.0 * q.accuracy()
            ),
            reference_qa.map_or(dash(), |r| q.changed_from(r).to_string()),
            reference_qa.map_or(dash(), |r| {
                let (lost, gained) = q.flips_from(r);
                format!("-{lost}/+{gained}")
            }),
        ),
        None => (dash(), dash(), dash()),
    };
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>14} {:>14} {:>10} {:>9}",
        name,
        short_number(t.ppl()),
        compare(ppl_change(t.ppl() / base_ppl)),
        compare(format!("{:.1}%", 100.0 * t.agreement())),
        compare(format!("{:.4}", t.mean_kl())),
        compare(format!("{:.4}", t.kl_quantile(0.95))),
        compare(format!("{:.3}", t.max_kl())),
        experts,
        qa,
        changed,
        flips
    );
}

/// A perplexity in at most 9 characters: a catastrophic policy's can run
/// to millions, and the table should stay aligned when it does.
fn short_number(x: f64) -> String {
    if x < 1e5 { format!("{x:.3}") } else { format!("{x:.2e}") }
}

/// The change of perplexity as a percentage, or as a factor once it is
/// beyond +1000 %, where percentages stop being readable.
fn ppl_change(ratio: f64) -> String {
    if ratio < 11.0 {
        format!("{:+.2}%", 100.0 * (ratio - 1.0))
    } else {
        format!("x{ratio:.0}")
    }
}

fn print_notes(report: &EvalReport) {
    println!("ref: exact = the reference run (exact routing, same schedule) that the other rows are compared with;");
    println!(
        "  an `exact` row is an independent second run: a control that shows the noise floor (0 when deterministic)."
    );
    println!("Δppl = change of perplexity against the reference; top-1 agr = predictions whose most likely token is");
    println!("  the reference's; KL = KL(exact || policy) per prediction in nats (mean, 95th percentile, max).");
    println!(
        "experts/layer = distinct experts loaded per MoE layer per decode step, of those exact routing would load."
    );
    println!("QA exact-match = answers containing the known answer as whole words after lowercasing and removing");
    println!("  punctuation; QA changed = answers whose text differs from the reference's; -/+ = correct answers");
    println!("  lost/gained against the reference.");
    println!(
        "  The first answer token comes from the (exact) prefill, so QA measures the policy from the second token on."
    );
    let per = report.reference.tokens / report.windows.max(1);
    for row in &report.rows {
        if let Some((w, kl)) = row.text.worst_window()
            && kl > 0.0
        {
            let start = report.window_starts.get(w).copied().unwrap_or(0);
            let ppl_w = (row.text.window_nll[w] / per.max(1) as f64).exp();
            let ppl_ref = (report.reference.window_nll[w] / per.max(1) as f64).exp();
            println!(
                "worst window for {}: #{w} (tokens {start}..{} of {}): mean KL {kl:.4}, ppl {} vs {}",
                row.policy,
                start + report.options.window,
                report.text_tokens,
                short_number(ppl_w),
                short_number(ppl_ref)
            );
        }
    }
}

/// The settings that policies given without parameters resolve to on this
/// model, so that a reader knows what `lynx` and `oea` meant.
fn print_resolved(report: &EvalReport, e: usize, k: usize) {
    use lynx::selection::Resolved;
    for row in &report.rows {
        match (row.policy, row.policy.resolve(e, k)) {
            (ExpertPolicy::Lynx(None), Ok(Resolved::Lynx(p))) => println!(
                "lynx = AffinityBinning with alpha {:.2}, beta {}, threshold bin {} (derived from K/E)",
                p.alpha, p.beta, p.threshold_bin
            ),
            (ExpertPolicy::Oea { k0: 0 }, Ok(Resolved::Keep { keep, .. })) => {
                println!("oea = OEA keeping each token's top {keep} (k0 = K/2)")
            }
            _ => {}
        }
    }
}

fn print_answers(data: &EvalData, report: &EvalReport, reference: &lynx_cli::eval::QaScores) {
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    for (i, q) in data.questions.iter().enumerate() {
        println!("Q{} {} [{}]", i + 1, q.question, q.answer);
        println!(
            "  {:<12} {} {}",
            "ref: exact",
            mark(reference.correct[i]),
            one_line(&reference.answers[i])
        );
        for row in &report.rows {
            if let Some(qa) = &row.qa {
                let same = if qa.answers[i] == reference.answers[i] {
                    "(same)".to_string()
                } else {
                    one_line(&qa.answers[i])
                };
                println!("  {:<12} {} {same}", row.policy.to_string(), mark(qa.correct[i]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_short() {
        assert_eq!(short_number(76.7189), "76.719");
        assert_eq!(short_number(120740.757), "1.21e5");
        assert_eq!(ppl_change(1.679), "+67.90%");
        assert_eq!(ppl_change(0.99), "-1.00%");
        assert_eq!(ppl_change(1573.8), "x1574");
    }

    #[test]
    fn default_policies_halve_k() {
        let p = default_policies(8);
        assert_eq!(p[0], ExpertPolicy::Exact);
        assert_eq!(p[3], ExpertPolicy::TopK(4));
        assert_eq!(default_policies(1)[3], ExpertPolicy::TopK(1));
    }
}
