//! Throughput measurement of the GPU engine (`lynx bench`): prefill and
//! decode tokens/s for several batch sizes and expert-selection policies in
//! one run, with the distinct experts and model bytes a decode step reads,
//! the bandwidth that achieves, and the selection kernels' own cost.
//!
//! Prompts are real text: windows of the held-out evaluation text
//! (`models/eval/heldout.txt`), a different window per sequence, so MoE
//! routing sees the token mix it would see in use, not random ids.

use std::sync::Arc;
use std::time::Instant;

use lynx::error::{Error, Result};
use lynx::generate::StepSpec;
use lynx::gpu::{GpuModel, bench_selection};
use lynx::metrics::StepMetrics;
use lynx::model::Logits;
use lynx::selection::ExpertPolicy;
use lynx::tokenizer::Tokenizer;

/// The text bench prompts are cut from.
pub const BENCH_TEXT: &str = include_str!("../../models/eval/heldout.txt");

/// One (batch size, expert policy) measurement.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub batch: usize,
    /// The expert-selection policy of the decode steps.
    pub policy: ExpertPolicy,
    /// Prompt tokens processed, and the seconds the prefill took (one
    /// prefill per batch size, shared by its policies' rows).
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    /// Tokens generated in the timed decode steps, and their seconds.
    pub decode_tokens: usize,
    pub decode_s: f64,
    /// Mean over decode steps and MoE layers of the experts that received
    /// at least one token after selection, and under exact routing; `None`
    /// for dense models.
    pub distinct_experts: Option<f64>,
    pub distinct_exact: Option<f64>,
    /// Mean expert weight bytes one decode step reads (all MoE layers).
    pub expert_bytes_per_step: f64,
    /// Mean weight bytes one decode step reads: every dense matrix once,
    /// plus each MoE layer's active experts.
    pub weight_bytes_per_step: f64,
    /// Mean KV-cache bytes one decode step reads (keys and values of every
    /// cached position of every sequence, all layers).
    pub kv_bytes_per_step: f64,
    /// GPU seconds per decode step spent in the selection kernels (all MoE
    /// layers; `gpu::bench_selection`), measured apart from the timed
    /// steps; 0 for exact routing.
    pub selection_s_per_step: f64,
}

impl BenchRow {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_s
    }

    pub fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_s
    }

    pub fn decode_step_s(&self) -> f64 {
        self.decode_s / (self.decode_tokens as f64 / self.batch as f64)
    }

    /// Achieved bandwidth of decode: bytes read per step over step time.
    pub fn decode_gb_s(&self) -> f64 {
        (self.weight_bytes_per_step + self.kv_bytes_per_step) / self.decode_step_s() / 1e9
    }
}

/// `b` prompts of `n` tokens each, from different places in [`BENCH_TEXT`].
pub fn bench_prompts(tok: &Tokenizer, b: usize, n: usize) -> Result<Vec<Vec<u32>>> {
    let ids = tok.encode(BENCH_TEXT, false)?;
    if ids.len() < n + b {
        return Err(Error::InvalidArgument(format!(
            "the bench text has {} tokens, too few for {b} prompts of {n}",
            ids.len()
        )));
    }
    let stride = (ids.len() - n) / b.max(1);
    Ok((0..b).map(|i| ids[i * stride..i * stride + n].to_vec()).collect())
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefills `prompts` as one batch (exact routing, as every prefill), then,
/// for each policy in turn, rewinds the sequences to their prompts and
/// times `steps` greedy decode steps of the whole batch, so that every
/// policy decodes from the same state. One untimed warm-up step per policy
/// (pipeline compilation, scratch allocation) runs before the timed ones.
pub fn bench_batch(
    gpu: &GpuModel,
    prompts: &[Vec<u32>],
    policies: &[ExpertPolicy],
    steps: usize,
) -> Result<Vec<BenchRow>> {
    let b = prompts.len();
    if b == 0 || steps == 0 || policies.is_empty() {
        return Err(Error::InvalidArgument(
            "bench needs at least one prompt, one policy and one step".into(),
        ));
    }
    let cfg = gpu.config.clone();
    // Every policy is checked against the model before anything runs.
    for p in policies {
        p.resolve_for(&cfg)?;
    }
    let mut seqs: Vec<_> = (0..b).map(|_| gpu.new_sequence()).collect();

    let start = Instant::now();
    let mut batch: Vec<_> = seqs.iter_mut().zip(prompts).map(|(s, p)| (s, p.as_slice())).collect();
    let logits = gpu.forward(&mut batch, Logits::Last)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let prefill_tokens = prompts.iter().map(|p| p.len()).sum();
    let first: Vec<[u32; 1]> = logits.iter().map(|r| [argmax(r)]).collect();

    let dense_bytes = gpu.dense_bytes_per_step() as f64;
    let kv_row = (cfg.num_kv_heads * cfg.head_dim * 4 * 2 * cfg.num_layers) as f64;
    let moe_layers = gpu.expert_bytes_per_layer().iter().filter(|l| l.is_some()).count();
    let mut rows = Vec::new();
    for &policy in policies {
        for (s, p) in seqs.iter_mut().zip(prompts) {
            s.truncate(p.len());
        }
        let mut next = first.clone();
        // One greedy decode step under the policy; returns its metrics.
        let mut step = |seqs: &mut Vec<lynx::gpu::GpuSequence>| -> Result<Arc<StepMetrics>> {
            let mut batch: Vec<_> = seqs
                .iter_mut()
                .zip(next.iter())
                .map(|(s, t)| (s, t.as_slice()))
                .collect();
            let out = gpu.run_blocking(&mut batch, StepSpec::decode(policy).with_metrics())?;
            next = out.logits.iter().map(|r| [argmax(r)]).collect();
            match &out.metrics[..] {
                [m] => Ok(m.clone()),
                _ => Err(Error::Gpu(format!(
                    "a decode step of {b} tokens ran as {} engine steps",
                    out.metrics.len()
                ))),
            }
        };
        step(&mut seqs)?; // Warm-up.
        let (mut distinct, mut exact, mut expert_bytes, mut kv_bytes, mut decode_s) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for _ in 0..steps {
            let cached: usize = seqs.iter().map(|s| s.len() + 1).sum();
            let t0 = Instant::now();
            let m = step(&mut seqs)?;
            decode_s += t0.elapsed().as_secs_f64();
            distinct += m.mean_distinct_selected();
            exact += m.mean_distinct_exact();
            expert_bytes += m.expert_bytes() as f64;
            kv_bytes += cached as f64 * kv_row;
        }
        let selection_s_per_step = match &cfg.moe {
            Some(m) if !policy.is_exact() => {
                let resolved = policy.resolve(m.num_experts, m.top_k)?;
                bench_selection(&gpu.ctx, resolved, b, m.num_experts, m.top_k, 10)? * moe_layers as f64
            }
            _ => 0.0,
        };
        let n = steps as f64;
        rows.push(BenchRow {
            batch: b,
            policy,
            prefill_tokens,
            prefill_s,
            decode_tokens: b * steps,
            decode_s,
            distinct_experts: cfg.moe.is_some().then_some(distinct / n),
            distinct_exact: cfg.moe.is_some().then_some(exact / n),
            expert_bytes_per_step: expert_bytes / n,
            weight_bytes_per_step: dense_bytes + expert_bytes / n,
            kv_bytes_per_step: kv_bytes / n,
            selection_s_per_step,
        });
    }
    Ok(rows)
}
