//! What the server reports about itself: the Prometheus text of `/metrics`
//! and the hub that fans the engine's per-step expert-selection metrics
//! out to `/v1/experts/stream` viewers.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::broadcast;

use lynx::metrics::StepMetrics;
use lynx::serving::SchedulerStats;

/// How many steps a slow viewer may fall behind before it skips some.
const VIEWER_BACKLOG: usize = 256;

/// Counters the HTTP layer keeps beside the scheduler's.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Requests refused with a 4xx before reaching the scheduler.
    pub invalid: AtomicU64,
    /// Requests refused with 429 because the queue was full.
    pub queue_full: AtomicU64,
    /// Requests ended by the request timeout.
    pub timed_out: AtomicU64,
}

/// Receives the engine's [`StepMetrics`] on its own thread, keeps the
/// latest decode step for `/metrics`, and broadcasts every step to viewers.
pub struct ExpertHub {
    latest_decode: Mutex<Option<Arc<StepMetrics>>>,
    steps: AtomicU64,
    tx: broadcast::Sender<Arc<StepMetrics>>,
}

impl ExpertHub {
    /// Starts the hub on `rx` (from `GpuModel::subscribe`). The thread ends
    /// when the engine stops sending or the hub is dropped, whichever is
    /// first; dropping the receiver then unsubscribes from the engine.
    pub fn start(rx: Receiver<Arc<StepMetrics>>) -> std::io::Result<Arc<ExpertHub>> {
        let (tx, _) = broadcast::channel(VIEWER_BACKLOG);
        let hub = Arc::new(ExpertHub {
            latest_decode: Mutex::new(None),
            steps: AtomicU64::new(0),
            tx,
        });
        let weak: Weak<ExpertHub> = Arc::downgrade(&hub);
        std::thread::Builder::new()
            .name("lynx-expert-hub".into())
            .spawn(move || {
                loop {
                    // The timeout lets the thread notice a dropped hub while the
                    // engine is idle and sends nothing.
                    let m = match rx.recv_timeout(Duration::from_millis(250)) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    };
                    let Some(hub) = weak.upgrade() else { return };
                    if let Some(m) = m {
                        hub.publish(m);
                    }
                }
            })?;
        Ok(hub)
    }

    fn publish(&self, m: Arc<StepMetrics>) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        if m.decode
            && let Ok(mut latest) = self.latest_decode.lock()
        {
            *latest = Some(m.clone());
        }
        // No viewer attached is not an error.
        let _ = self.tx.send(m);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StepMetrics>> {
        self.tx.subscribe()
    }

    pub fn latest_decode(&self) -> Option<Arc<StepMetrics>> {
        self.latest_decode.lock().ok().and_then(|m| m.clone())
    }

    pub fn viewers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// Everything `/metrics` shows, gathered at one moment.
pub struct Snapshot<'a> {
    pub model_id: &'a str,
    pub policy: &'a str,
    pub max_batch: usize,
    pub max_queue: usize,
    pub stats: SchedulerStats,
    pub http: &'a HttpCounters,
    pub hub: Option<&'a ExpertHub>,
}

/// Renders the Prometheus text exposition format (version 0.0.4).
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {}", fmt_value(*v));
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let st = s.stats;
    metric(
        "lynx_info",
        "gauge",
        "The served model and the expert-selection policy of decode steps.",
        &[(
            format!("{{model=\"{}\",policy=\"{}\"}}", escape(s.model_id), escape(s.policy)),
            1.0,
        )],
    );
    metric(
        "lynx_queue_depth",
        "gauge",
        "Requests waiting for a batch slot.",
        &one(st.queued as f64),
    );
    metric(
        "lynx_queue_capacity",
        "gauge",
        "The most requests that may wait; more get 429.",
        &one(s.max_queue as f64),
    );
    metric(
        "lynx_running_batch_size",
        "gauge",
        "Sequences in the running batch.",
        &one(st.running as f64),
    );
    metric(
        "lynx_max_batch_size",
        "gauge",
        "The most sequences decoded together.",
        &one(s.max_batch as f64),
    );
    metric(
        "lynx_tokens_per_second",
        "gauge",
        "Generated tokens per second over the last decode step (batch size / step time).",
        &one(st.last_step_tok_s),
    );
    metric(
        "lynx_generated_tokens_total",
        "counter",
        "Tokens generated by decode steps.",
        &one(st.generated_tokens as f64),
    );
    metric(
        "lynx_decode_steps_total",
        "counter",
        "Decode steps run.",
        &one(st.decode_steps as f64),
    );
    metric(
        "lynx_requests_total",
        "counter",
        "Requests that reached the scheduler, by how they ended.",
        &[
            ("{outcome=\"completed\"}".into(), st.completed as f64),
            ("{outcome=\"cancelled\"}".into(), st.cancelled as f64),
            ("{outcome=\"failed\"}".into(), st.failed as f64),
        ],
    );
    metric(
        "lynx_requests_rejected_total",
        "counter",
        "Requests refused before the scheduler, by reason.",
        &[
            (
                "{reason=\"invalid\"}".into(),
                s.http.invalid.load(Ordering::Relaxed) as f64,
            ),
            (
                "{reason=\"queue_full\"}".into(),
                s.http.queue_full.load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    metric(
        "lynx_requests_timed_out_total",
        "counter",
        "Requests ended by the request timeout (also counted as cancelled).",
        &one(s.http.timed_out.load(Ordering::Relaxed) as f64),
    );
    if let Some(hub) = s.hub {
        metric(
            "lynx_expert_viewers",
            "gauge",
            "Clients attached to /v1/experts/stream.",
            &one(hub.viewers() as f64),
        );
        metric(
            "lynx_engine_steps_total",
            "counter",
            "Engine steps (prefill and decode) whose expert metrics were collected.",
            &one(hub.steps.load(Ordering::Relaxed) as f64),
        );
        if let Some(m) = hub.latest_decode() {
            metric(
                "lynx_last_decode_step_tokens",
                "gauge",
                "Tokens (sequences) in the latest decode step.",
                &one(m.tokens as f64),
            );
            let mut samples = Vec::with_capacity(2 * m.layers.len());
            for l in &m.layers {
                samples.push((
                    format!("{{layer=\"{}\",routing=\"exact\"}}", l.layer),
                    l.distinct_exact as f64,
                ));
                samples.push((
                    format!("{{layer=\"{}\",routing=\"selected\"}}", l.layer),
                    l.distinct_selected as f64,
                ));
            }
            metric(
                "lynx_layer_distinct_experts",
                "gauge",
                "Distinct experts per MoE layer in the latest decode step: as exact routing would load them, and as the policy selected them.",
                &samples,
            );
            metric(
                "lynx_mean_distinct_experts",
                "gauge",
                "Distinct experts per MoE layer in the latest decode step, averaged over layers.",
                &[
                    ("{routing=\"exact\"}".into(), m.mean_distinct_exact()),
                    ("{routing=\"selected\"}".into(), m.mean_distinct_selected()),
                ],
            );
            metric(
                "lynx_last_decode_expert_bytes",
                "gauge",
                "Expert weight bytes the latest decode step read.",
                &one(m.expert_bytes() as f64),
            );
        }
    }
    out
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// Escapes a label value as the exposition format asks.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lynx::metrics::LayerMetrics;

    fn layer(layer: usize, exact: usize, selected: usize) -> LayerMetrics {
        LayerMetrics {
            layer,
            distinct_exact: exact,
            distinct_selected: selected,
            tokens_per_expert: vec![],
            bins: vec![],
            remapped: vec![],
            expert_bytes: 10,
        }
    }

    fn step(decode: bool) -> Arc<StepMetrics> {
        Arc::new(StepMetrics {
            step: 3,
            policy: "lynx".into(),
            decode,
            tokens: 4,
            top_k: 2,
            layers: vec![layer(0, 6, 3), layer(1, 5, 4)],
            seconds: 0.1,
        })
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let (tx, rx) = std::sync::mpsc::channel();
        let hub = ExpertHub::start(rx).unwrap();
        let mut viewer = hub.subscribe();
        tx.send(step(true)).unwrap();
        tx.send(step(false)).unwrap();
        // The hub thread publishes asynchronously; the viewer sees both steps.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let a = tokio::time::timeout(Duration::from_secs(10), viewer.recv())
                .await
                .unwrap()
                .unwrap();
            let b = tokio::time::timeout(Duration::from_secs(10), viewer.recv())
                .await
                .unwrap()
                .unwrap();
            (a.decode, b.decode)
        });
        assert_eq!(got, (true, false));
        let http = HttpCounters::default();
        http.queue_full.store(2, Ordering::Relaxed);
        let stats = SchedulerStats {
            queued: 5,
            running: 3,
            completed: 7,
            last_step_tok_s: 12.5,
            ..Default::default()
        };
        let text = render(&Snapshot {
            model_id: "m\"x",
            policy: "lynx",
            max_batch: 8,
            max_queue: 16,
            stats,
            http: &http,
            hub: Some(&hub),
        });
        for line in [
            "lynx_queue_depth 5",
            "lynx_running_batch_size 3",
            "lynx_tokens_per_second 12.5",
            "lynx_requests_total{outcome=\"completed\"} 7",
            "lynx_requests_rejected_total{reason=\"queue_full\"} 2",
            "lynx_info{model=\"m\\\"x\",policy=\"lynx\"} 1",
            // The prefill step came last but the gauges show the decode step.
            "lynx_layer_distinct_experts{layer=\"0\",routing=\"exact\"} 6",
            "lynx_layer_distinct_experts{layer=\"1\",routing=\"selected\"} 4",
            "lynx_mean_distinct_experts{routing=\"selected\"} 3.5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        // Every sample belongs to a family announced with HELP and TYPE.
        let mut typed = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "sample without TYPE: {l}");
            }
        }
    }
}
