//! Expert-selection metrics: what each MoE layer did at each step, and the
//! skew summaries the viewer and the server show. The GPU engine produces a
//! [`StepMetrics`] per step for its subscribers (`GpuModel::subscribe`) and
//! `--trace` writes them as JSON lines.

use serde::Serialize;

/// One MoE layer at one step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerMetrics {
    pub layer: usize,
    /// Distinct experts the exact routing would load (T_exact).
    pub distinct_exact: usize,
    /// Distinct experts loaded after selection (T_lynx, or the policy's).
    pub distinct_selected: usize,
    /// Tokens routed to each expert after selection (slots padded with
    /// weight 0 are counted with the token's top-1 expert).
    pub tokens_per_expert: Vec<u32>,
    /// (T, K) AffinityBinning bin of each exact slot (Lynx only; else empty).
    pub bins: Vec<i32>,
    /// (T, K) whether each slot's expert was replaced (empty under exact).
    pub remapped: Vec<bool>,
    /// Expert weight bytes this layer read: active experts times one
    /// expert's gate, up and down matrices.
    pub expert_bytes: u64,
}

/// One forward step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Steps since the model was loaded.
    pub step: u64,
    /// The policy in force (`exact` for prefill steps whatever is selected).
    pub policy: String,
    /// Whether this was a decode step (the only kind policies apply to).
    pub decode: bool,
    /// Tokens in the step (the batch size, for decode steps).
    pub tokens: usize,
    /// K, the slots per token.
    pub top_k: usize,
    pub layers: Vec<LayerMetrics>,
    /// Seconds from the step's start until its results were read back.
    pub seconds: f64,
}

impl StepMetrics {
    pub fn mean_distinct_exact(&self) -> f64 {
        mean(self.layers.iter().map(|l| l.distinct_exact as f64))
    }

    pub fn mean_distinct_selected(&self) -> f64 {
        mean(self.layers.iter().map(|l| l.distinct_selected as f64))
    }

    pub fn expert_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.expert_bytes).sum()
    }
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (n, s) = it.fold((0usize, 0.0), |(n, s), v| (n + 1, s + v));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Load skew of one layer's per-expert token counts.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Skew {
    /// Busiest expert's load over the mean load (1 = perfectly even).
    pub max_over_mean: f64,
    /// Shannon entropy of the load distribution over ln(E), in [0, 1]
    /// (1 = even).
    pub entropy: f64,
    /// Gini coefficient of the loads, in [0, 1) (0 = even).
    pub gini: f64,
}

/// Skew of `counts` (tokens per expert). All zeros gives an even skew.
pub fn skew(counts: &[f64]) -> Skew {
    let e = counts.len();
    let total: f64 = counts.iter().sum();
    if e == 0 || total <= 0.0 {
        return Skew {
            max_over_mean: 1.0,
            entropy: 1.0,
            gini: 0.0,
        };
    }
    let mean = total / e as f64;
    let max = counts.iter().copied().fold(0.0, f64::max);
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| -(c / total) * (c / total).ln())
        .sum();
    let entropy = if e > 1 { h / (e as f64).ln() } else { 1.0 };
    // Gini = Σ_i Σ_j |x_i - x_j| / (2 E² mean).
    let mut sorted = counts.to_vec();
    sorted.sort_by(f64::total_cmp);
    let weighted: f64 = sorted
        .iter()
        .enumerate()
        .map(|(i, &x)| (2.0 * (i as f64 + 1.0) - e as f64 - 1.0) * x)
        .sum();
    let gini = weighted / (e as f64 * total);
    Skew {
        max_over_mean: max / mean,
        entropy,
        gini,
    }
}

/// Writes a stream of [`StepMetrics`] (from `GpuModel::subscribe`) as JSON
/// lines on a background thread (`--trace FILE`), so that the decode loop
/// never waits on the disk.
#[cfg(not(target_arch = "wasm32"))]
pub struct TraceWriter {
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<std::io::Result<u64>>,
}

#[cfg(not(target_arch = "wasm32"))]
impl TraceWriter {
    /// Creates (or truncates) `path` and starts writing the steps `rx`
    /// receives, one JSON object per line.
    pub fn start(
        rx: std::sync::mpsc::Receiver<std::sync::Arc<StepMetrics>>,
        path: &std::path::Path,
    ) -> crate::Result<TraceWriter> {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        use std::sync::mpsc::RecvTimeoutError;
        let file = std::fs::File::create(path).map_err(|e| crate::Error::io(path, e))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lynx trace".into())
            .spawn(move || -> std::io::Result<u64> {
                let mut out = std::io::BufWriter::new(file);
                let mut lines = 0u64;
                loop {
                    // The engine sends a step's metrics before its forward
                    // call returns, so once `finish` is called, whatever is
                    // left is already in the channel.
                    match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                        Ok(m) => {
                            serde_json::to_writer(&mut out, &*m)?;
                            out.write_all(b"\n")?;
                            lines += 1;
                        }
                        Err(RecvTimeoutError::Timeout) if !flag.load(Ordering::Acquire) => {}
                        Err(_) => break,
                    }
                }
                out.flush()?;
                Ok(lines)
            })
            .map_err(|e| crate::Error::io(path, e))?;
        Ok(TraceWriter {
            path: path.to_path_buf(),
            stop,
            thread,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes what is still queued, closes the file and returns the number
    /// of steps written.
    pub fn finish(self) -> crate::Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        match self.thread.join() {
            Ok(r) => r.map_err(|e| crate::Error::io(&self.path, e)),
            Err(_) => Err(crate::Error::io(
                &self.path,
                std::io::Error::other("the trace writer panicked"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_of_even_and_concentrated_loads() {
        let even = skew(&[4.0, 4.0, 4.0, 4.0]);
        assert!((even.max_over_mean - 1.0).abs() < 1e-12);
        assert!((even.entropy - 1.0).abs() < 1e-12);
        assert!(even.gini.abs() < 1e-12);
        let one = skew(&[0.0, 0.0, 0.0, 8.0]);
        assert!((one.max_over_mean - 4.0).abs() < 1e-12);
        assert!(one.entropy.abs() < 1e-12);
        assert!((one.gini - 0.75).abs() < 1e-12);
        let some = skew(&[1.0, 2.0, 3.0, 4.0]);
        // Σ|xi - xj| over ordered pairs = 20; 20 / (2 * 16 * 2.5) = 0.25.
        assert!((some.gini - 0.25).abs() < 1e-12);
        assert_eq!(skew(&[0.0, 0.0]).gini, 0.0);
    }
}
