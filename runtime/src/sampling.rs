//! Turning a logits vector into the next token: greedy argmax, or
//! temperature / top-k / top-p (nucleus) sampling from a seeded generator.
//!
//! The random generator is ChaCha8 seeded with `seed_from_u64`, whose output
//! is specified bit for bit, so a given seed draws the same tokens on every
//! platform and with every build of Lynx.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// How `Sampler` picks a token from logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature. 0 selects greedy decoding (argmax), which makes
    /// `top_k`, `top_p` and `seed` irrelevant.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits before sampling; 0 turns the
    /// filter off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most probable tokens whose
    /// probabilities sum to at least `top_p`; 1.0 turns the filter off.
    pub top_p: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding, because it is deterministic and the natural choice
    /// when comparing against reference implementations.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Whether these parameters select greedy (argmax) decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the parameters, naming the offending field in the error.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        // The negated comparison also rejects NaN.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A token sampler with its own random generator. One sampler serves one
/// sequence, so that each sequence's draws depend only on its own seed.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Reused between calls to avoid allocating a vocabulary-sized buffer
    /// for every token: (token id, logit, then weight).
    candidates: Vec<Candidate>,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
    weight: f64,
}

/// Orders candidates by decreasing logit, breaking ties by increasing token
/// id so that every filter is deterministic and agrees with greedy argmax.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

impl Sampler {
    /// Creates a sampler after validating `params`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            candidates: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one value per vocabulary entry).
    ///
    /// NaN logits are treated as -inf, i.e. never chosen, so that a numeric
    /// problem in one entry does not abort generation; if no entry is
    /// finite or +inf the logits carry no information and this fails with
    /// `Error::InvalidArgument`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "{} logits do not fit u32 token ids",
                logits.len()
            )));
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }

        // Gather the usable entries. +inf is clamped to f32::MAX so that the
        // subtraction of the maximum below never computes inf - inf; several
        // +inf entries then share the probability mass equally.
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| is_usable(**l))
                .map(|(i, &l)| Candidate {
                    id: i as u32,
                    logit: l.min(f32::MAX),
                    weight: 0.0,
                }),
        );
        if self.candidates.is_empty() {
            return Err(no_usable_logits(logits.len()));
        }

        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            // Partition so that the k best candidates come first; this is
            // linear, whereas a full sort of the vocabulary is not.
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }

        // Softmax with temperature, in f64 so that the subtraction cannot
        // overflow and tiny probabilities still add up correctly. Dividing
        // after subtracting the maximum keeps very small temperatures finite:
        // the best token gets exp(0) = 1 and the others underflow to 0.
        let max = self
            .candidates
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let t = self.params.temperature as f64;
        let mut total = 0.0f64;
        for c in &mut self.candidates {
            c.weight = ((c.logit as f64 - max) / t).exp();
            total += c.weight;
        }

        if self.params.top_p < 1.0 {
            // The nucleus needs the candidates in decreasing probability.
            self.candidates.sort_unstable_by(by_logit_desc);
            let threshold = self.params.top_p as f64 * total;
            let mut cumulative = 0.0f64;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += c.weight;
                if cumulative >= threshold {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            total = self.candidates.iter().map(|c| c.weight).sum();
        }

        // Inverse-CDF draw over the unnormalised weights.
        let u = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0f64;
        for c in &self.candidates {
            cumulative += c.weight;
            if u < cumulative {
                return Ok(c.id);
            }
        }
        // Rounding can leave `u` just above the last cumulative sum; the last
        // candidate with positive weight is then the right answer.
        let last = self
            .candidates
            .iter()
            .rev()
            .find(|c| c.weight > 0.0)
            .unwrap_or(&self.candidates[0]);
        Ok(last.id)
    }
}

/// A logit can be chosen if it is neither NaN nor -inf.
fn is_usable(l: f32) -> bool {
    !l.is_nan() && l != f32::NEG_INFINITY
}

fn no_usable_logits(n: usize) -> Error {
    Error::InvalidArgument(format!("cannot sample: all {n} logits are NaN or -inf"))
}

/// Index of the largest usable logit, the lowest index among ties.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if !is_usable(l) {
            continue;
        }
        // Strictly greater keeps the first of equal maxima.
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    match best {
        Some((i, _)) => Ok(i as u32),
        None => Err(no_usable_logits(logits.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    /// Pseudo-random logits with a reproducible spread, for property tests.
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        p.validate().unwrap();
    }

    #[test]
    fn validate_names_the_field() {
        for t in [-0.5, f32::NAN, f32::INFINITY] {
            let e = params(t, 0, 1.0, 0).validate().unwrap_err().to_string();
            assert!(e.contains("temperature"), "{e}");
        }
        for p in [0.0, -0.1, 1.5, f32::NAN] {
            let e = params(1.0, 0, p, 0).validate().unwrap_err().to_string();
            assert!(e.contains("top_p"), "{e}");
        }
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).is_err());
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9]).unwrap(), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0]).unwrap(), 1);
        assert_eq!(s.sample(&[-1.0, -1.0]).unwrap(), 0);
        for seed in 0..20 {
            let l = logits(1000, seed);
            let expect = l
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .unwrap()
                .0 as u32;
            assert_eq!(s.sample(&l).unwrap(), expect);
        }
    }

    #[test]
    fn nan_logits_are_skipped_and_all_invalid_is_an_error() {
        let mut greedy = Sampler::new(SamplingParams::default()).unwrap();
        let mut hot = Sampler::new(params(1.0, 0, 1.0, 3)).unwrap();
        let l = [f32::NAN, 1.0, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(greedy.sample(&l).unwrap(), 1);
        for _ in 0..100 {
            assert_eq!(hot.sample(&l).unwrap(), 1);
        }
        let bad = [f32::NAN, f32::NEG_INFINITY, f32::NAN];
        assert!(matches!(greedy.sample(&bad), Err(Error::InvalidArgument(_))));
        assert!(matches!(hot.sample(&bad), Err(Error::InvalidArgument(_))));
        assert!(matches!(hot.sample(&[]), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn positive_infinity_wins() {
        let mut hot = Sampler::new(params(1.0, 0, 1.0, 3)).unwrap();
        let l = [0.0, f32::INFINITY, 1e30, f32::NAN];
        for _ in 0..100 {
            assert_eq!(hot.sample(&l).unwrap(), 1);
        }
    }

    #[test]
    fn tiny_temperature_is_finite_and_greedy() {
        let mut s = Sampler::new(params(1e-30, 0, 1.0, 9)).unwrap();
        let l = logits(500, 4);
        let g = argmax(&l).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&l).unwrap(), g);
        }
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() {
        for (i, t) in [0.1f32, 1.0, 5.0, 100.0].into_iter().enumerate() {
            let mut s = Sampler::new(params(t, 1, 1.0, i as u64)).unwrap();
            for seed in 0..30 {
                let l = logits(300, seed);
                assert_eq!(s.sample(&l).unwrap(), argmax(&l).unwrap());
            }
            // Ties resolve to the lowest id, as in greedy decoding.
            assert_eq!(s.sample(&[0.0, 2.0, 2.0]).unwrap(), 1);
        }
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        for t in [0.5f32, 1.0, 10.0] {
            let mut s = Sampler::new(params(t, 0, 1e-6, 42)).unwrap();
            for seed in 0..30 {
                let l = logits(300, seed);
                assert_eq!(s.sample(&l).unwrap(), argmax(&l).unwrap());
            }
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.643, 0.237, 0.087, 0.032]: top_p 0.8 must keep
        // exactly the first two tokens (0.643 < 0.8 <= 0.880).
        let l = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.8, 5)).unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..5000 {
            seen[s.sample(&l).unwrap() as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        let p0 = seen[0] as f64 / 5000.0;
        let expect = 0.643 / (0.643 + 0.237);
        assert!((p0 - expect).abs() < 0.03, "{p0} vs {expect}");
    }

    #[test]
    fn top_k_never_leaves_the_top_k() {
        let l = logits(200, 11);
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        for k in [2usize, 5, 17] {
            let allowed = &order[..k];
            // A high temperature flattens the distribution so that tokens
            // outside the top k would appear if the filter leaked.
            let mut s = Sampler::new(params(50.0, k, 1.0, k as u64)).unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..3000 {
                let t = s.sample(&l).unwrap();
                assert!(allowed.contains(&t), "k={k}: token {t} not in top k");
                seen.insert(t);
            }
            assert_eq!(seen.len(), k, "all top-k tokens should be drawn at a high temperature");
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different() {
        let l = vec![0.0f32; 50];
        let draw = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..200).map(|_| s.sample(&l).unwrap()).collect()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn frequencies_match_softmax_at_temperature_one() {
        let l = [1.0f32, 2.0, 0.5, 3.0, -1.0, 2.5];
        let expect = softmax(&l);
        let mut s = Sampler::new(params(1.0, 0, 1.0, 1234)).unwrap();
        let n = 20_000;
        let mut counts = vec![0usize; l.len()];
        for _ in 0..n {
            counts[s.sample(&l).unwrap() as usize] += 1;
        }
        for (i, (&c, &p)) in counts.iter().zip(&expect).enumerate() {
            let f = c as f64 / n as f64;
            assert!((f - p).abs() < 0.02, "token {i}: frequency {f}, softmax {p}");
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let l = [1.0f32, 2.0, 0.0];
        let freq_of_best = |t: f32| {
            let mut s = Sampler::new(params(t, 0, 1.0, 77)).unwrap();
            (0..10_000).filter(|_| s.sample(&l).unwrap() == 1).count() as f64 / 10_000.0
        };
        // softmax([2, 4, 0]) for t = 0.5 gives the best token ~0.867;
        // softmax([0.1, 0.2, 0]) for t = 10 gives ~0.366.
        assert!((freq_of_best(0.5) - 0.867).abs() < 0.02);
        assert!((freq_of_best(10.0) - 0.366).abs() < 0.02);
    }
}
