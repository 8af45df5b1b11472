//! Throughput measurement of the GPU engine (`lynx bench`): prefill and
//! decode tokens/s for several batch sizes, with the model bytes a decode
//! step reads and the bandwidth that achieves.
//!
//! Prompts are real text: windows of the held-out evaluation text
//! (`models/eval/heldout.txt`), a different window per sequence, so MoE
//! routing sees the token mix it would see in use, not random ids.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::GpuModel;
use crate::model::Logits;
use crate::tokenizer::Tokenizer;

/// The text bench prompts are cut from.
pub const BENCH_TEXT: &str = include_str!("../../models/eval/heldout.txt");

/// One batch size's measurements.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub batch: usize,
    /// Prompt tokens processed, and the seconds the prefill took.
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    /// Tokens generated in the timed decode steps, and their seconds.
    pub decode_tokens: usize,
    pub decode_s: f64,
    /// Mean over decode steps and MoE layers of the experts that received
    /// at least one token; `None` for dense models.
    pub distinct_experts: Option<f64>,
    /// Mean weight bytes one decode step reads: every dense matrix once,
    /// plus each MoE layer's active experts.
    pub weight_bytes_per_step: f64,
    /// Mean KV-cache bytes one decode step reads (keys and values of every
    /// cached position of every sequence, all layers).
    pub kv_bytes_per_step: f64,
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

/// Prefills `prompts` as one batch, then times `steps` greedy decode steps
/// of the whole batch. One warm-up step (pipeline compilation, scratch
/// allocation) runs before the timed ones.
pub fn bench_batch(gpu: &mut GpuModel, prompts: &[Vec<u32>], steps: usize) -> Result<BenchRow> {
    let b = prompts.len();
    if b == 0 || steps == 0 {
        return Err(Error::InvalidArgument(
            "bench needs at least one prompt and one step".into(),
        ));
    }
    let cfg = gpu.config.clone();
    gpu.collect_metrics = true;
    let mut seqs: Vec<_> = (0..b).map(|_| gpu.new_sequence()).collect();

    let start = Instant::now();
    let mut batch: Vec<_> = seqs.iter_mut().zip(prompts).map(|(s, p)| (s, p.as_slice())).collect();
    let logits = gpu.forward(&mut batch, Logits::Last)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let prefill_tokens = prompts.iter().map(|p| p.len()).sum();

    let mut next: Vec<[u32; 1]> = logits.iter().map(|r| [argmax(r)]).collect();
    let step = |seqs: &mut Vec<crate::gpu::GpuSequence>, next: &mut Vec<[u32; 1]>| -> Result<()> {
        let mut batch: Vec<_> = seqs
            .iter_mut()
            .zip(next.iter())
            .map(|(s, t)| (s, t.as_slice()))
            .collect();
        let logits = gpu.forward(&mut batch, Logits::Last)?;
        *next = logits.iter().map(|r| [argmax(r)]).collect();
        Ok(())
    };
    step(&mut seqs, &mut next)?; // Warm-up.

    let dense_bytes = gpu.dense_bytes_per_step() as f64;
    let kv_row = (cfg.num_kv_heads * cfg.head_dim * 4 * 2 * cfg.num_layers) as f64;
    let mut distinct = 0.0;
    let mut weight_bytes = 0.0;
    let mut kv_bytes = 0.0;
    let mut decode_s = 0.0;
    for _ in 0..steps {
        let cached: usize = seqs.iter().map(|s| s.len() + 1).sum();
        let t0 = Instant::now();
        step(&mut seqs, &mut next)?;
        decode_s += t0.elapsed().as_secs_f64();
        let m = gpu
            .last_metrics()
            .ok_or_else(|| Error::Gpu("the step produced no metrics".into()))?;
        distinct += m.mean_distinct_selected();
        weight_bytes += dense_bytes + m.expert_bytes() as f64;
        kv_bytes += cached as f64 * kv_row;
    }
    gpu.collect_metrics = false;
    let n = steps as f64;
    Ok(BenchRow {
        batch: b,
        prefill_tokens,
        prefill_s,
        decode_tokens: b * steps,
        decode_s,
        distinct_experts: cfg.moe.is_some().then_some(distinct / n),
        weight_bytes_per_step: weight_bytes / n,
        kv_bytes_per_step: kv_bytes / n,
    })
}
