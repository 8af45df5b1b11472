//! A closed-loop load generator for the server: `clients` threads each send
//! streaming completion requests one after another and time them, so that the
//! server always has `clients` requests in flight. It reports requests per
//! second, latency percentiles and generated tokens per second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http_client::SseStream;

/// One load run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Concurrent clients, each with one request in flight.
    pub clients: usize,
    /// Requests each client sends, one after another.
    pub requests_per_client: usize,
    /// Tokens per reply; requests set `ignore_eos` so every reply has
    /// exactly this many, and runs with different policies do equal work.
    pub max_tokens: usize,
    /// Bounds every read and write of a request.
    pub timeout: Duration,
}

/// How one request went.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds from sending the request to the end of its stream.
    pub latency_s: f64,
    /// Seconds from sending the request to its first content.
    pub first_token_s: f64,
    /// Completion tokens, from the usage chunk.
    pub tokens: usize,
    pub text: String,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub clients: usize,
    pub samples: Vec<Sample>,
    /// One line per failed request.
    pub errors: Vec<String>,
    pub wall_s: f64,
}

impl LoadReport {
    pub fn requests_per_s(&self) -> f64 {
        self.samples.len() as f64 / self.wall_s.max(1e-9)
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.samples.iter().map(|s| s.tokens).sum::<usize>() as f64 / self.wall_s.max(1e-9)
    }

    /// The `q`-quantile (nearest rank) of the latencies, in seconds.
    pub fn latency_quantile(&self, q: f64) -> f64 {
        quantile(self.samples.iter().map(|s| s.latency_s).collect(), q)
    }

    pub fn first_token_quantile(&self, q: f64) -> f64 {
        quantile(self.samples.iter().map(|s| s.first_token_s).collect(), q)
    }
}

/// Nearest-rank quantile; NaN for no values.
pub fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The prompts the clients cycle through: short starts of text, different
/// enough that the batch routes to different experts. They are sent to
/// `/v1/completions` rather than as chat, so that a request's cost is
/// mostly decode steps, where the expert-selection policy applies, and not
/// the prefill of a chat template's system prompt (which routes exactly).
pub const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Once upon a time",
    "def add(a, b):",
    "Water boils at",
    "The first president of the United States was",
    "1, 2, 3, 4,",
    "The sky is blue because",
    "My favourite food is",
    "In the beginning",
    "The cat sat on",
    "To make a cake, you need",
    "The largest planet is",
    "Dear Sir or Madam,",
    "import numpy as",
    "Roses are red,",
    "The quick brown fox",
];

/// The request body client `client` sends as its `i`-th request.
pub fn completion_body(client: usize, i: usize, max_tokens: usize) -> String {
    let prompt = PROMPTS[(client * 7 + i) % PROMPTS.len()];
    serde_json::json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    })
    .to_string()
}

/// Runs one streaming completion to the end.
pub fn stream_completion(addr: SocketAddr, body: &str, timeout: Duration) -> Result<Sample, String> {
    let t0 = Instant::now();
    let mut s = SseStream::open(addr, "POST", "/v1/completions", Some(body.as_bytes()), timeout)
        .map_err(|e| format!("request failed: {e}"))?;
    if s.status != 200 {
        let status = s.status;
        return Err(format!("status {status}: {}", s.rest().unwrap_or_default()));
    }
    let mut sample = Sample {
        latency_s: 0.0,
        first_token_s: 0.0,
        tokens: 0,
        text: String::new(),
    };
    loop {
        let Some(ev) = s.next_event().map_err(|e| format!("reading the stream failed: {e}"))? else {
            return Err(format!("the stream ended without [DONE] after {:?}", sample.text));
        };
        if ev.data == "[DONE]" {
            sample.latency_s = t0.elapsed().as_secs_f64();
            return Ok(sample);
        }
        let v: Value = serde_json::from_str(&ev.data).map_err(|e| format!("bad chunk {:?}: {e}", ev.data))?;
        if let Some(err) = v.get("error") {
            return Err(format!("error in the stream: {err}"));
        }
        if let Some(t) = v.pointer("/choices/0/text").and_then(Value::as_str)
            && !t.is_empty()
        {
            if sample.text.is_empty() {
                sample.first_token_s = t0.elapsed().as_secs_f64();
            }
            sample.text.push_str(t);
        }
        if let Some(n) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
            sample.tokens = n as usize;
        }
    }
}

/// Runs `spec` against the server at `addr`.
pub fn run(addr: SocketAddr, spec: &LoadSpec) -> LoadReport {
    let t0 = Instant::now();
    let results: Vec<Vec<Result<Sample, String>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..spec.clients)
            .map(|c| {
                s.spawn(move || {
                    (0..spec.requests_per_client)
                        .map(|i| stream_completion(addr, &completion_body(c, i, spec.max_tokens), spec.timeout))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| vec![Err("a client thread panicked".into())])
            })
            .collect()
    });
    let wall_s = t0.elapsed().as_secs_f64();
    let mut report = LoadReport {
        clients: spec.clients,
        samples: Vec::new(),
        errors: Vec::new(),
        wall_s,
    };
    for r in results.into_iter().flatten() {
        match r {
            Ok(s) => report.samples.push(s),
            Err(e) => report.errors.push(e),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(v.clone(), 0.5), 50.0);
        assert_eq!(quantile(v.clone(), 0.99), 99.0);
        assert_eq!(quantile(v, 1.0), 100.0);
        assert_eq!(quantile(vec![3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(vec![7.0], 0.99), 7.0);
        assert!(quantile(vec![], 0.5).is_nan());
    }
}
