//! Batch-aware expert selection: policies that rewrite a decode step's
//! routing so that the batch as a whole touches fewer distinct experts.
//!
//! Every policy starts from the exact routing (each token's top-K experts,
//! best first, from `model::route`) and the router logits, and produces a
//! new routing in which every token still has K slots. The GPU engine runs
//! the same algorithms as WGSL kernels (`gpu::selection`); the plain
//! functions here are their oracle.
//!
//! Policies (`--experts`):
//! - `exact`: the architecture's own routing.
//! - `lynx`: AffinityBinning from the Lynx paper (arXiv 2411.08982), below.
//! - `oea`: Opportunistic Expert Activation (arXiv 2511.02237): each token
//!   keeps its top-k0; the union of those is the loaded set; each token's
//!   remaining slots are filled only from that set.
//! - `topk=N`: every token keeps only its top-N experts.
//!
//! ## Lynx AffinityBinning
//! For token t and each expert e among its top-K, the affinity gap is
//! `g = logit[t][e] - max_e' logit[t][e']` (≤ 0; 0 for its top-1), and its
//! bin is `clamp(floor(alpha * g), -beta, 0)` (0 = highest affinity). The
//! batch score of expert e is `score[e] = Σ_{t chose e} B^bin(t,e)` for a
//! batch of B tokens, so one vote in bin 0 outweighs up to B-1 votes in bin
//! -1, and so on: experts that confident tokens want dominate. The active
//! set holds every token's top-1 expert, then experts in descending score
//! while `score >= B^threshold_bin` (by default 1 = B^0: at least one bin-0
//! vote, or B bin -1 votes, ...), and then, if fewer than K experts are
//! active, the best-scored others until K are (so every token can keep K
//! distinct experts). Each token then takes its K highest-affinity experts
//! *within* the active set, which keeps its top-1 and replaces its
//! low-affinity choices outside the set; the routing weights are the
//! softmax probabilities of the new experts, renormalised when the
//! architecture renormalises.
//!
//! ### alpha and beta from the sparsity ratio K/E alone
//! With softmax routing, a gap g means the expert is e^g times as likely as
//! the token's favourite. A router that knew nothing would spread its mass
//! evenly: over its K choices the ratio between "uniform over K" and
//! "uniform over all E" probabilities is K/E, a gap of `-ln(E/K)`. Choices
//! at least that far below the favourite carry no more preference than a
//! uniform router would give, so they all share the lowest bin. The gaps in
//! `[-ln(E/K), 0]` are split evenly into bins, one per slot a token can
//! lose: `beta = K - 1` bins below bin 0 and `alpha = beta / ln(E/K)` bins
//! per unit of logit. (K = E leaves no room to select and gets beta = 0.)
//! Examples: Mixtral (E=8, K=2): beta 1, alpha 0.72; the demo MoE (E=16,
//! K=8): beta 7, alpha 10.1; OLMoE (E=64, K=8): beta 7, alpha 3.37.
//!
//! The policies apply only to decode steps (one new token per sequence),
//! which are bound by memory bandwidth; prefill and steps that mix in
//! prefill chunks keep exact routing.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The Lynx AffinityBinning parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LynxParams {
    /// Bins per unit of router logit.
    pub alpha: f32,
    /// The lowest bin is -beta.
    pub beta: u32,
    /// Experts stay active while their score is at least B^threshold_bin.
    pub threshold_bin: i32,
}

impl LynxParams {
    /// The parameters derived from the sparsity ratio K/E (module docs).
    pub fn for_sparsity(e: usize, k: usize) -> LynxParams {
        if k >= e || k <= 1 {
            return LynxParams {
                alpha: 0.0,
                beta: 0,
                threshold_bin: 0,
            };
        }
        let beta = (k - 1) as u32;
        let alpha = beta as f32 / ((e as f32) / (k as f32)).ln();
        LynxParams {
            alpha,
            beta,
            threshold_bin: 0,
        }
    }
}

/// A selection policy, as chosen with `--experts`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertPolicy {
    Exact,
    /// Lynx with explicit parameters, or `None` to derive them from K/E.
    Lynx(Option<LynxParams>),
    /// OEA keeping each token's top-k0.
    Oea {
        k0: usize,
    },
    /// Static per-token top-N.
    TopK(usize),
}

impl ExpertPolicy {
    /// `oea` without k0 keeps half of K (at least 1), the setting the OEA
    /// paper reports as its main trade-off point.
    pub const DEFAULT_OEA_FRACTION: f32 = 0.5;

    pub fn is_exact(&self) -> bool {
        matches!(self, ExpertPolicy::Exact)
    }
}

impl fmt::Display for ExpertPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpertPolicy::Exact => f.write_str("exact"),
            ExpertPolicy::Lynx(None) => f.write_str("lynx"),
            ExpertPolicy::Lynx(Some(p)) => {
                write!(
                    f,
                    "lynx:alpha={},beta={},threshold={}",
                    p.alpha, p.beta, p.threshold_bin
                )
            }
            ExpertPolicy::Oea { k0: 0 } => f.write_str("oea"),
            ExpertPolicy::Oea { k0 } => write!(f, "oea={k0}"),
            ExpertPolicy::TopK(n) => write!(f, "topk={n}"),
        }
    }
}

impl FromStr for ExpertPolicy {
    type Err = Error;

    /// `exact`, `lynx`, `lynx:alpha=A,beta=B,threshold=T`, `oea`, `oea=K0`, `topk=N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "expert policy `{s}`: {why} (expected exact, lynx, lynx:alpha=A,beta=B,threshold=T, oea, oea=K0 or topk=N)"
            ))
        };
        let num = |v: &str| v.parse::<usize>().map_err(|_| bad("not a whole number"));
        match s {
            "exact" => return Ok(ExpertPolicy::Exact),
            "lynx" => return Ok(ExpertPolicy::Lynx(None)),
            "oea" => return Ok(ExpertPolicy::Oea { k0: 0 }),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("topk=") {
            let n = num(n)?;
            return if n == 0 {
                Err(bad("N must be at least 1"))
            } else {
                Ok(ExpertPolicy::TopK(n))
            };
        }
        if let Some(k0) = s.strip_prefix("oea=") {
            let k0 = num(k0)?;
            return if k0 == 0 {
                Err(bad("k0 must be at least 1"))
            } else {
                Ok(ExpertPolicy::Oea { k0 })
            };
        }
        if let Some(rest) = s.strip_prefix("lynx:") {
            let mut p = LynxParams {
                alpha: f32::NAN,
                beta: u32::MAX,
                threshold_bin: 0,
            };
            for kv in rest.split(',') {
                let (k, v) = kv.split_once('=').ok_or_else(|| bad("parameters are name=value"))?;
                match k {
                    "alpha" => p.alpha = v.parse().map_err(|_| bad("alpha is not a number"))?,
                    "beta" => p.beta = v.parse().map_err(|_| bad("beta is not a whole number"))?,
                    "threshold" => p.threshold_bin = v.parse().map_err(|_| bad("threshold is not an integer"))?,
                    _ => return Err(bad("unknown parameter")),
                }
            }
            if !(p.alpha.is_finite() && p.alpha >= 0.0) || p.beta == u32::MAX || p.threshold_bin > 0 {
                return Err(bad("lynx: needs alpha >= 0, beta and threshold <= 0"));
            }
            return Ok(ExpertPolicy::Lynx(Some(p)));
        }
        Err(bad("unknown policy"))
    }
}

/// A policy resolved for one model: everything the kernels need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resolved {
    Exact,
    Lynx(LynxParams),
    /// Keep each token's first `keep` slots; fill the rest from the union
    /// of every token's first `keep` slots (OEA), or from nothing (top-N),
    /// padding unfilled slots with weight 0.
    Keep {
        keep: usize,
        union: bool,
    },
}

impl ExpertPolicy {
    /// Checks the policy against a model: an MoE model's E and K (see
    /// [`ExpertPolicy::resolve`]); a dense model accepts only `exact`.
    pub fn resolve_for(&self, config: &crate::ModelConfig) -> Result<Resolved> {
        match &config.moe {
            Some(m) => self.resolve(m.num_experts, m.top_k),
            None if self.is_exact() => Ok(Resolved::Exact),
            None => Err(Error::InvalidArgument(format!(
                "expert policy `{self}` needs an MoE model; this one is dense"
            ))),
        }
    }

    /// Checks the policy against the model's E and K and fills in defaults.
    pub fn resolve(&self, e: usize, k: usize) -> Result<Resolved> {
        Ok(match *self {
            ExpertPolicy::Exact => Resolved::Exact,
            ExpertPolicy::Lynx(p) => Resolved::Lynx(p.unwrap_or_else(|| LynxParams::for_sparsity(e, k))),
            ExpertPolicy::Oea { k0 } => {
                let k0 = if k0 == 0 {
                    ((k as f32 * Self::DEFAULT_OEA_FRACTION) as usize).max(1)
                } else {
                    k0
                };
                if k0 > k {
                    return Err(Error::InvalidArgument(format!("oea={k0}: k0 must be at most K = {k}")));
                }
                Resolved::Keep { keep: k0, union: true }
            }
            ExpertPolicy::TopK(n) => {
                if n > k {
                    return Err(Error::InvalidArgument(format!("topk={n}: N must be at most K = {k}")));
                }
                Resolved::Keep { keep: n, union: false }
            }
        })
    }
}

/// The result of a selection for one layer and step.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// (T, K) new experts per slot, and their routing weights.
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// (T, K) bin of each exact slot (Lynx; 0 for other policies).
    pub bins: Vec<i32>,
    /// (T, K) whether the slot's expert changed.
    pub remapped: Vec<bool>,
    /// (E) whether each expert is in the active (loaded) set.
    pub active: Vec<bool>,
}

/// The oracle: applies `policy` to one step's exact routing.
/// `logits` (T, E) are the router logits, `ids` (T, K) the exact choices
/// best first; `renormalize` is whether the architecture renormalises the
/// top-K weights. `batch` is B, the number of tokens in the step.
pub fn select_cpu(policy: Resolved, logits: &[f32], ids: &[u32], e: usize, k: usize, renormalize: bool) -> Selection {
    let t = ids.len() / k;
    let mut bins = vec![0i32; t * k];
    let mut active = vec![false; e];
    let keep;
    match policy {
        Resolved::Exact => {
            let weights = exact_weights(logits, ids, e, k, renormalize);
            for &id in ids {
                active[id as usize] = true;
            }
            return Selection {
                ids: ids.to_vec(),
                weights,
                bins,
                remapped: vec![false; t * k],
                active,
            };
        }
        Resolved::Lynx(p) => {
            keep = 1;
            let inv_b = 1.0 / t as f32;
            let mut score = vec![0f32; e];
            // Scores summed in token-then-slot order, as the GPU kernel does.
            for tok in 0..t {
                let row = &logits[tok * e..(tok + 1) * e];
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for s in 0..k {
                    let id = ids[tok * k + s] as usize;
                    let b = bin(row[id] - m, p);
                    bins[tok * k + s] = b;
                }
            }
            for (ex, sc) in score.iter_mut().enumerate() {
                for a in 0..t * k {
                    if ids[a] as usize == ex {
                        *sc += pow_inv(inv_b, bins[a]);
                    }
                }
            }
            let tau = pow_inv(inv_b, p.threshold_bin);
            for tok in 0..t {
                active[ids[tok * k] as usize] = true;
            }
            for ex in 0..e {
                if score[ex] >= tau {
                    active[ex] = true;
                }
            }
            // At least K active experts, by descending score, ties to the lower index.
            let mut count = active.iter().filter(|a| **a).count();
            while count < k.min(e) {
                let mut best = usize::MAX;
                for ex in 0..e {
                    if !active[ex] && (best == usize::MAX || score[ex] > score[best]) {
                        best = ex;
                    }
                }
                active[best] = true;
                count += 1;
            }
        }
        Resolved::Keep { keep: n, union } => {
            keep = n;
            if union {
                for tok in 0..t {
                    for s in 0..n {
                        active[ids[tok * k + s] as usize] = true;
                    }
                }
            }
        }
    }
    remap_cpu(logits, ids, e, k, keep, &active, renormalize, bins)
}

/// Each token keeps its first `keep` slots and fills the others with its
/// highest-affinity active experts not already taken (ties to the lower
/// index); slots nothing can fill repeat its top-1 with weight 0.
#[allow(clippy::too_many_arguments)]
fn remap_cpu(
    logits: &[f32],
    ids: &[u32],
    e: usize,
    k: usize,
    keep: usize,
    active: &[bool],
    renormalize: bool,
    bins: Vec<i32>,
) -> Selection {
    let t = ids.len() / k;
    let mut new_ids = vec![0u32; t * k];
    let mut weights = vec![0f32; t * k];
    let mut remapped = vec![false; t * k];
    for tok in 0..t {
        let row = &logits[tok * e..(tok + 1) * e];
        let probs = softmax_row(row);
        let mut taken = vec![false; e];
        let mut filled = 0;
        for s in 0..keep.min(k) {
            let id = ids[tok * k + s];
            new_ids[tok * k + s] = id;
            taken[id as usize] = true;
            filled += 1;
        }
        while filled < k {
            let mut best = usize::MAX;
            for ex in 0..e {
                if active[ex] && !taken[ex] && (best == usize::MAX || row[ex] > row[best]) {
                    best = ex;
                }
            }
            if best == usize::MAX {
                break;
            }
            taken[best] = true;
            new_ids[tok * k + filled] = best as u32;
            filled += 1;
        }
        let real = filled;
        let mut sum = 0f32;
        for s in 0..real {
            let w = probs[new_ids[tok * k + s] as usize];
            weights[tok * k + s] = w;
            sum += w;
        }
        if renormalize {
            for s in 0..real {
                weights[tok * k + s] /= sum;
            }
        }
        for s in real..k {
            new_ids[tok * k + s] = new_ids[tok * k];
            weights[tok * k + s] = 0.0;
        }
        for s in 0..k {
            remapped[tok * k + s] = new_ids[tok * k + s] != ids[tok * k + s] || s >= real;
        }
    }
    Selection {
        ids: new_ids,
        weights,
        bins,
        remapped,
        active: active.to_vec(),
    }
}

/// `clamp(floor(alpha * g), -beta, 0)`.
pub fn bin(gap: f32, p: LynxParams) -> i32 {
    let b = (p.alpha * gap).floor();
    b.clamp(-(p.beta as f32), 0.0) as i32
}

/// `B^bin` for bin <= 0 as repeated multiplication by `inv_b = 1/B`: exact
/// and identical to the kernel's loop (WGSL multiplication is correctly
/// rounded; its division and pow are not).
pub fn pow_inv(inv_b: f32, bin: i32) -> f32 {
    let mut w = 1.0f32;
    for _ in 0..(-bin).max(0) {
        w *= inv_b;
    }
    w
}

/// `model::softmax` of one row, as a new vector.
fn softmax_row(row: &[f32]) -> Vec<f32> {
    let mut p = row.to_vec();
    crate::model::softmax(&mut p);
    p
}

fn exact_weights(logits: &[f32], ids: &[u32], e: usize, k: usize, renormalize: bool) -> Vec<f32> {
    let t = ids.len() / k;
    let mut w = vec![0f32; t * k];
    for tok in 0..t {
        let probs = softmax_row(&logits[tok * e..(tok + 1) * e]);
        let mut sum = 0f32;
        for s in 0..k {
            w[tok * k + s] = probs[ids[tok * k + s] as usize];
            sum += w[tok * k + s];
        }
        if renormalize {
            for s in 0..k {
                w[tok * k + s] /= sum;
            }
        }
    }
    w
}

/// Distinct experts in a routing.
pub fn distinct_experts(ids: &[u32], weights: &[f32]) -> usize {
    let mut seen: Vec<u32> = ids
        .iter()
        .zip(weights)
        .filter(|(_, w)| **w != 0.0)
        .map(|(i, _)| *i)
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_parameters() {
        let p = LynxParams::for_sparsity(8, 2);
        assert_eq!(p.beta, 1);
        assert!((p.alpha - 1.0 / 4f32.ln()).abs() < 1e-6);
        let p = LynxParams::for_sparsity(16, 8);
        assert_eq!(p.beta, 7);
        assert!((p.alpha - 7.0 / 2f32.ln()).abs() < 1e-5);
        assert_eq!(LynxParams::for_sparsity(8, 8).beta, 0);
    }

    #[test]
    fn policies_parse_and_print() {
        for s in ["exact", "lynx", "oea", "oea=2", "topk=3"] {
            let p: ExpertPolicy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        let p: ExpertPolicy = "lynx:alpha=2.5,beta=3,threshold=-1".parse().unwrap();
        assert_eq!(
            p,
            ExpertPolicy::Lynx(Some(LynxParams {
                alpha: 2.5,
                beta: 3,
                threshold_bin: -1
            }))
        );
        for bad in ["", "lynx:alpha=x", "topk=0", "topk=-1", "oea=0", "fast", "lynx:beta=2"] {
            let err = bad.parse::<ExpertPolicy>().unwrap_err().to_string();
            assert!(err.contains("expert policy"), "{bad}: {err}");
        }
        assert!(ExpertPolicy::TopK(9).resolve(16, 8).is_err());
        assert_eq!(
            ExpertPolicy::Oea { k0: 0 }.resolve(16, 8).unwrap(),
            Resolved::Keep { keep: 4, union: true }
        );
    }

    #[test]
    fn bins_follow_the_gap() {
        let p = LynxParams {
            alpha: 2.0,
            beta: 3,
            threshold_bin: 0,
        };
        assert_eq!(bin(0.0, p), 0);
        assert_eq!(bin(-0.1, p), -1);
        assert_eq!(bin(-0.5, p), -1);
        assert_eq!(bin(-0.51, p), -2);
        assert_eq!(bin(-10.0, p), -3);
    }

    /// A hand-worked batch: two confident tokens outvote the weak choices.
    #[test]
    fn lynx_shrinks_the_active_set_and_keeps_top1() {
        let (e, k) = (4, 2);
        // Token 0 prefers 0 then 2 (far), token 1 prefers 1 then 3 (far),
        // token 2 prefers 0 then 1 (both close).
        let logits = [3.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.0, 1.0, 3.0, 2.95, 0.0, 0.0];
        let ids = [0, 2, 1, 3, 0, 1];
        let p = LynxParams {
            alpha: 1.0,
            beta: 1,
            threshold_bin: 0,
        };
        let s = select_cpu(Resolved::Lynx(p), &logits, &ids, e, k, true);
        assert_eq!(s.bins, vec![0, -1, 0, -1, 0, -1]);
        assert_eq!(s.active, vec![true, true, false, false]);
        // Every token keeps its top-1 and is remapped onto {0, 1}.
        assert_eq!(s.ids, vec![0, 1, 1, 0, 0, 1]);
        assert_eq!(s.remapped, vec![false, true, false, true, false, false]);
        assert_eq!(distinct_experts(&s.ids, &s.weights), 2);
        for tok in 0..3 {
            let sum: f32 = s.weights[tok * k..(tok + 1) * k].iter().sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn one_token_batch_keeps_its_routing() {
        // B = 1: every vote scores B^bin = 1 >= 1, so nothing changes.
        let logits = [0.3, 2.0, -1.0, 0.5];
        let ids = [1, 3];
        let s = select_cpu(
            Resolved::Lynx(LynxParams::for_sparsity(4, 2)),
            &logits,
            &ids,
            4,
            2,
            true,
        );
        assert_eq!(s.ids, ids);
        assert!(s.remapped.iter().all(|r| !r));
    }

    #[test]
    fn topk_and_oea_pad_with_zero_weights() {
        let logits = [3.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0];
        let ids = [0, 1, 2, 3, 2, 1];
        let s = select_cpu(Resolved::Keep { keep: 1, union: false }, &logits, &ids, 4, 3, true);
        assert_eq!(s.ids, vec![0, 0, 0, 3, 3, 3]);
        assert_eq!(s.weights, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        // OEA with k0 = 1: the union is {0, 3}; each token fills from it.
        let s = select_cpu(Resolved::Keep { keep: 1, union: true }, &logits, &ids, 4, 3, true);
        assert_eq!(s.ids, vec![0, 3, 0, 3, 0, 3]);
        assert_eq!(s.weights[2], 0.0);
        assert_eq!(distinct_experts(&s.ids, &s.weights), 2);
    }
}
