//! Aggregation of the runtime's per-step routing metrics into what the
//! plots show: the current decode step, a rolling window of recent decode
//! steps, and capped time series. Pure data: no egui, no threads.
//!
//! Only decode steps are aggregated, because expert-selection policies
//! apply only to them; prefill steps (many tokens of one prompt, always
//! routed exactly) are counted but would swamp the per-expert loads.

use std::collections::VecDeque;
use std::sync::Arc;

use lynx::metrics::{Skew, StepMetrics, skew};

/// The most decode steps a rolling window may cover.
pub const MAX_WINDOW: usize = 256;
/// The most points each time series keeps; older ones are dropped.
pub const HISTORY_CAP: usize = 600;

/// One decode step, as the time-series plots need it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPoint {
    /// Decode steps seen before this one since the last reset (the x axis).
    pub index: u64,
    /// The runtime's step counter (prefill steps included).
    pub step: u64,
    /// The batch size B (one token per sequence in a decode step).
    pub tokens: usize,
    /// Generated tokens per second in this step: B over the step's seconds.
    pub tok_s: f64,
    pub policy: String,
    /// Per MoE layer, distinct experts under exact routing and after selection.
    pub distinct_exact: Vec<u16>,
    pub distinct_selected: Vec<u16>,
    /// Expert weight bytes read, and what exact routing would have read.
    pub expert_bytes: u64,
    pub exact_expert_bytes: u64,
}

impl StepPoint {
    fn from_metrics(index: u64, m: &StepMetrics) -> StepPoint {
        let exact_bytes = m
            .layers
            .iter()
            .map(|l| {
                // Every active expert costs the same bytes in a layer, so the
                // bytes exact routing would read scale with its distinct count.
                if l.distinct_selected == 0 {
                    0
                } else {
                    l.expert_bytes / l.distinct_selected as u64 * l.distinct_exact as u64
                }
            })
            .sum();
        StepPoint {
            index,
            step: m.step,
            tokens: m.tokens,
            tok_s: if m.seconds > 0.0 {
                m.tokens as f64 / m.seconds
            } else {
                0.0
            },
            policy: m.policy.clone(),
            distinct_exact: m.layers.iter().map(|l| l.distinct_exact as u16).collect(),
            distinct_selected: m.layers.iter().map(|l| l.distinct_selected as u16).collect(),
            expert_bytes: m.expert_bytes(),
            exact_expert_bytes: exact_bytes,
        }
    }

    pub fn mean_distinct_exact(&self) -> f64 {
        mean_u16(&self.distinct_exact)
    }

    pub fn mean_distinct_selected(&self) -> f64 {
        mean_u16(&self.distinct_selected)
    }
}

fn mean_u16(v: &[u16]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
    }
}

/// A layers × experts grid of loads, one row per MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    /// The model layer index of each row.
    pub layers: Vec<usize>,
    /// E values per row.
    pub rows: Vec<Vec<f64>>,
    pub max: f64,
}

impl Heatmap {
    pub fn experts(&self) -> usize {
        self.rows.first().map_or(0, |r| r.len())
    }
}

/// Per-layer skew of one heatmap, and its mean over layers.
#[derive(Clone, Debug, PartialEq)]
pub struct SkewSummary {
    pub per_layer: Vec<(usize, Skew)>,
    pub mean: Skew,
}

/// The running aggregate of a metrics stream.
#[derive(Clone, Debug)]
pub struct MetricsAggregate {
    window: usize,
    /// The last decode steps, newest last, at most `MAX_WINDOW`.
    recent: VecDeque<Arc<StepMetrics>>,
    /// The last decode step and the last step of any kind.
    pub last_decode: Option<Arc<StepMetrics>>,
    pub last_step: Option<Arc<StepMetrics>>,
    pub history: VecDeque<StepPoint>,
    pub decode_steps: u64,
    pub prefill_steps: u64,
    /// The largest decode batch seen since the last reset.
    pub max_batch: usize,
}

impl Default for MetricsAggregate {
    fn default() -> Self {
        MetricsAggregate::new(32)
    }
}

impl MetricsAggregate {
    pub fn new(window: usize) -> MetricsAggregate {
        MetricsAggregate {
            window: window.clamp(1, MAX_WINDOW),
            recent: VecDeque::new(),
            last_decode: None,
            last_step: None,
            history: VecDeque::new(),
            decode_steps: 0,
            prefill_steps: 0,
            max_batch: 0,
        }
    }

    /// Forgets everything (a new model was loaded), keeping the window.
    pub fn reset(&mut self) {
        *self = MetricsAggregate::new(self.window);
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Sets how many recent decode steps the rolling averages cover.
    pub fn set_window(&mut self, window: usize) {
        self.window = window.clamp(1, MAX_WINDOW);
    }

    pub fn push(&mut self, m: Arc<StepMetrics>) {
        self.last_step = Some(m.clone());
        if !m.decode {
            self.prefill_steps += 1;
            return;
        }
        // A step with another shape (another model) starts the aggregate afresh.
        if let Some(prev) = &self.last_decode
            && !same_shape(prev, &m)
        {
            let window = self.window;
            *self = MetricsAggregate::new(window);
            self.last_step = Some(m.clone());
        }
        self.history.push_back(StepPoint::from_metrics(self.decode_steps, &m));
        if self.history.len() > HISTORY_CAP {
            self.history.pop_front();
        }
        self.decode_steps += 1;
        self.max_batch = self.max_batch.max(m.tokens);
        self.recent.push_back(m.clone());
        if self.recent.len() > MAX_WINDOW {
            self.recent.pop_front();
        }
        self.last_decode = Some(m);
    }

    /// The decode steps the rolling window covers, oldest first.
    pub fn windowed(&self) -> impl Iterator<Item = &Arc<StepMetrics>> {
        let skip = self.recent.len().saturating_sub(self.window);
        self.recent.iter().skip(skip)
    }

    /// Steps in the rolling window right now (fewer than the window early on).
    pub fn window_len(&self) -> usize {
        self.recent.len().min(self.window)
    }

    /// Tokens per expert in the last decode step.
    pub fn heatmap_current(&self) -> Option<Heatmap> {
        self.last_decode.as_ref().map(|m| {
            heatmap(
                m.layers.iter().map(|l| l.layer).collect(),
                m.layers
                    .iter()
                    .map(|l| l.tokens_per_expert.iter().map(|&c| c as f64).collect())
                    .collect(),
            )
        })
    }

    /// Mean tokens per expert over the rolling window.
    pub fn heatmap_rolling(&self) -> Option<Heatmap> {
        let last = self.last_decode.as_ref()?;
        let mut sums: Vec<Vec<f64>> = last
            .layers
            .iter()
            .map(|l| vec![0.0; l.tokens_per_expert.len()])
            .collect();
        let mut n = 0usize;
        for m in self.windowed() {
            n += 1;
            for (row, l) in sums.iter_mut().zip(&m.layers) {
                for (s, &c) in row.iter_mut().zip(&l.tokens_per_expert) {
                    *s += c as f64;
                }
            }
        }
        let n = n.max(1) as f64;
        for row in &mut sums {
            for s in row.iter_mut() {
                *s /= n;
            }
        }
        Some(heatmap(last.layers.iter().map(|l| l.layer).collect(), sums))
    }

    /// Mean distinct experts per layer over the rolling window: (exact, selected).
    pub fn rolling_distinct(&self) -> Option<(f64, f64)> {
        let n = self.window_len();
        if n == 0 {
            return None;
        }
        let skip = self.history.len().saturating_sub(n);
        let (e, s) = self.history.iter().skip(skip).fold((0.0, 0.0), |(e, s), p| {
            (e + p.mean_distinct_exact(), s + p.mean_distinct_selected())
        });
        Some((e / n as f64, s / n as f64))
    }

    /// Tokens per second over the rolling window: all tokens over all seconds.
    pub fn rolling_tok_s(&self) -> Option<f64> {
        let (tokens, secs) = self
            .windowed()
            .fold((0usize, 0.0), |(t, s), m| (t + m.tokens, s + m.seconds));
        (secs > 0.0).then(|| tokens as f64 / secs)
    }

    /// The distinct-experts series: per decode step, the exact and selected
    /// counts of one layer (by row), or their mean over layers for `None`.
    pub fn distinct_series(&self, row: Option<usize>) -> (Vec<[f64; 2]>, Vec<[f64; 2]>) {
        let pick = |v: &[u16]| match row {
            Some(r) => v.get(r).map(|&x| x as f64),
            None => Some(mean_u16(v)),
        };
        let mut exact = Vec::with_capacity(self.history.len());
        let mut selected = Vec::with_capacity(self.history.len());
        for p in &self.history {
            if let (Some(e), Some(s)) = (pick(&p.distinct_exact), pick(&p.distinct_selected)) {
                exact.push([p.index as f64, e]);
                selected.push([p.index as f64, s]);
            }
        }
        (exact, selected)
    }

    /// Decode tokens per second per step, with the batch size of each step.
    pub fn tok_s_series(&self) -> Vec<[f64; 2]> {
        self.history.iter().map(|p| [p.index as f64, p.tok_s]).collect()
    }

    /// Where the policy changed in the history: (x, the new policy).
    pub fn policy_changes(&self) -> Vec<(f64, String)> {
        let mut out = Vec::new();
        let mut prev: Option<&str> = None;
        for p in &self.history {
            if prev != Some(p.policy.as_str()) {
                out.push((p.index as f64, p.policy.clone()));
                prev = Some(p.policy.as_str());
            }
        }
        out
    }

    /// Skew of the current step's loads, or of the rolling mean.
    pub fn skew_summary(&self, rolling: bool) -> Option<SkewSummary> {
        let h = if rolling {
            self.heatmap_rolling()?
        } else {
            self.heatmap_current()?
        };
        Some(skew_of(&h))
    }
}

/// Skew per row of a heatmap and the mean of each measure over rows.
pub fn skew_of(h: &Heatmap) -> SkewSummary {
    let per_layer: Vec<(usize, Skew)> = h.layers.iter().zip(&h.rows).map(|(&l, r)| (l, skew(r))).collect();
    let n = per_layer.len().max(1) as f64;
    let sum = per_layer.iter().fold((0.0, 0.0, 0.0), |(a, b, c), (_, s)| {
        (a + s.max_over_mean, b + s.entropy, c + s.gini)
    });
    let mean = if per_layer.is_empty() {
        skew(&[])
    } else {
        Skew {
            max_over_mean: sum.0 / n,
            entropy: sum.1 / n,
            gini: sum.2 / n,
        }
    };
    SkewSummary { per_layer, mean }
}

fn heatmap(layers: Vec<usize>, rows: Vec<Vec<f64>>) -> Heatmap {
    let max = rows.iter().flatten().copied().fold(0.0, f64::max);
    Heatmap { layers, rows, max }
}

fn same_shape(a: &StepMetrics, b: &StepMetrics) -> bool {
    a.layers.len() == b.layers.len()
        && a.layers
            .iter()
            .zip(&b.layers)
            .all(|(x, y)| x.layer == y.layer && x.tokens_per_expert.len() == y.tokens_per_expert.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lynx::metrics::LayerMetrics;

    /// A decode step over `layers` MoE layers of 4 experts with the given
    /// loads per layer, 2 slots per token.
    fn step(step: u64, decode: bool, loads: &[[u32; 4]], seconds: f64, policy: &str) -> Arc<StepMetrics> {
        let tokens = loads.first().map_or(0, |l| l.iter().sum::<u32>() as usize / 2);
        Arc::new(StepMetrics {
            step,
            policy: policy.into(),
            decode,
            tokens,
            top_k: 2,
            layers: loads
                .iter()
                .enumerate()
                .map(|(i, l)| LayerMetrics {
                    layer: i,
                    distinct_exact: 4,
                    distinct_selected: l.iter().filter(|&&c| c > 0).count(),
                    tokens_per_expert: l.to_vec(),
                    bins: vec![],
                    remapped: vec![],
                    expert_bytes: 100 * l.iter().filter(|&&c| c > 0).count() as u64,
                })
                .collect(),
            seconds,
        })
    }

    #[test]
    fn prefill_steps_are_counted_but_not_aggregated() {
        let mut a = MetricsAggregate::new(4);
        a.push(step(0, false, &[[10, 0, 0, 0]], 1.0, "exact"));
        assert_eq!(a.prefill_steps, 1);
        assert!(a.heatmap_current().is_none());
        assert!(a.history.is_empty());
        a.push(step(1, true, &[[1, 1, 0, 0]], 0.5, "lynx"));
        assert_eq!(a.decode_steps, 1);
        assert_eq!(
            a.heatmap_current().map(|h| h.rows),
            Some(vec![vec![1.0, 1.0, 0.0, 0.0]])
        );
        assert_eq!(a.last_step.as_ref().map(|m| m.step), Some(1));
    }

    #[test]
    fn rolling_mean_covers_only_the_window() {
        let mut a = MetricsAggregate::new(2);
        a.push(step(0, true, &[[4, 0, 0, 0]], 1.0, "exact"));
        a.push(step(1, true, &[[0, 4, 0, 0]], 1.0, "exact"));
        a.push(step(2, true, &[[0, 0, 2, 2]], 1.0, "exact"));
        let h = a.heatmap_rolling().expect("rolling heatmap");
        // The first step fell out of the two-step window.
        assert_eq!(h.rows, vec![vec![0.0, 2.0, 1.0, 1.0]]);
        assert_eq!(h.max, 2.0);
        assert_eq!(a.window_len(), 2);
        // Widening the window brings older steps back, as they are kept.
        a.set_window(3);
        let h = a.heatmap_rolling().expect("rolling heatmap");
        assert_eq!(h.rows, vec![vec![4.0 / 3.0, 4.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0]]);
    }

    #[test]
    fn rolling_tok_s_is_total_tokens_over_total_seconds() {
        let mut a = MetricsAggregate::new(8);
        a.push(step(0, true, &[[2, 2, 0, 0]], 1.0, "exact")); // 2 tokens in 1 s
        a.push(step(1, true, &[[4, 4, 0, 0]], 3.0, "exact")); // 4 tokens in 3 s
        let r = a.rolling_tok_s().expect("rate");
        assert!((r - 6.0 / 4.0).abs() < 1e-12, "{r}");
        let series = a.tok_s_series();
        assert_eq!(series, vec![[0.0, 2.0], [1.0, 4.0 / 3.0]]);
        assert_eq!(a.max_batch, 4);
    }

    #[test]
    fn history_is_capped_and_indices_keep_counting() {
        let mut a = MetricsAggregate::new(4);
        for i in 0..(HISTORY_CAP as u64 + 10) {
            a.push(step(i, true, &[[1, 1, 0, 0]], 0.1, "exact"));
        }
        assert_eq!(a.history.len(), HISTORY_CAP);
        assert_eq!(a.history.front().map(|p| p.index), Some(10));
        assert_eq!(a.history.back().map(|p| p.index), Some(HISTORY_CAP as u64 + 9));
        assert_eq!(a.recent.len(), MAX_WINDOW);
    }

    #[test]
    fn distinct_series_per_layer_and_mean() {
        let mut a = MetricsAggregate::new(4);
        a.push(step(0, true, &[[1, 1, 0, 0], [1, 1, 1, 1]], 1.0, "lynx"));
        let (exact, selected) = a.distinct_series(Some(0));
        assert_eq!(exact, vec![[0.0, 4.0]]);
        assert_eq!(selected, vec![[0.0, 2.0]]);
        let (_, mean_selected) = a.distinct_series(None);
        assert_eq!(mean_selected, vec![[0.0, 3.0]]);
        // A layer that does not exist gives no points rather than a panic.
        assert!(a.distinct_series(Some(5)).0.is_empty());
        assert_eq!(a.rolling_distinct(), Some((4.0, 3.0)));
        // Exact routing would have read all 4 experts in both layers.
        let p = &a.history[0];
        assert_eq!((p.expert_bytes, p.exact_expert_bytes), (600, 800));
    }

    #[test]
    fn policy_changes_mark_the_first_step_of_each_policy() {
        let mut a = MetricsAggregate::new(4);
        for (i, p) in ["exact", "exact", "lynx", "lynx", "oea=4", "exact"].iter().enumerate() {
            a.push(step(i as u64, true, &[[1, 1, 0, 0]], 1.0, p));
        }
        let marks: Vec<(f64, String)> = a.policy_changes();
        let names: Vec<&str> = marks.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(names, ["exact", "lynx", "oea=4", "exact"]);
        assert_eq!(marks.iter().map(|(x, _)| *x).collect::<Vec<_>>(), [0.0, 2.0, 4.0, 5.0]);
    }

    #[test]
    fn a_step_of_another_shape_restarts_the_aggregate() {
        let mut a = MetricsAggregate::new(4);
        a.push(step(0, true, &[[1, 1, 0, 0]], 1.0, "exact"));
        a.push(step(1, true, &[[1, 1, 0, 0], [2, 0, 0, 0]], 1.0, "exact"));
        assert_eq!(a.decode_steps, 1);
        assert_eq!(a.history.len(), 1);
        assert_eq!(a.heatmap_rolling().map(|h| h.rows.len()), Some(2));
    }

    #[test]
    fn skew_summary_of_even_and_concentrated_layers() {
        let mut a = MetricsAggregate::new(4);
        a.push(step(0, true, &[[2, 2, 2, 2], [8, 0, 0, 0]], 1.0, "exact"));
        let s = a.skew_summary(false).expect("skew");
        assert_eq!(s.per_layer.len(), 2);
        assert!((s.per_layer[0].1.max_over_mean - 1.0).abs() < 1e-12);
        assert!((s.per_layer[1].1.max_over_mean - 4.0).abs() < 1e-12);
        assert!((s.mean.max_over_mean - 2.5).abs() < 1e-12);
        assert!((s.mean.entropy - 0.5).abs() < 1e-12);
    }
}
