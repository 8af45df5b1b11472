//! The native driver: the runtime's serving loop on std threads.
//!
//! Two threads per loaded model:
//! - the *pump* (one for the driver's lifetime) takes the UI's commands,
//!   loads models, renders chat templates, submits requests, and forwards
//!   every request's events and every step's metrics to the UI;
//! - the *scheduler* thread runs `Scheduler::run` over the `GpuModel`, and
//!   is replaced when another model is loaded.
//!
//! The UI only ever reads a channel, so decode never waits for drawing; the
//! pump wakes the UI at a bounded rate so that a fast decode does not turn
//! into one repaint per token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use lynx::Tokenizer;
use lynx::gpu::{GpuContext, GpuModel, GpuOptions};
use lynx::metrics::StepMetrics;
use lynx::serving::{RequestHandle, Scheduler, SchedulerConfig};

use crate::driver::{
    Command, Driver, DriverEvent, LoadPhase, ModelInfo, RequestId, Submission, drain_requests, replaced, submit_all,
};

/// How often at most the pump wakes the UI while events keep coming.
const WAKE_INTERVAL: Duration = Duration::from_millis(100);
/// The most sequences decoded together: what several tabs or a QA batch need.
const MAX_BATCH: usize = 32;
/// The biggest document the QA mode reads.
const MAX_DOCUMENT_BYTES: u64 = 1 << 20;

/// Called by the pump to ask the UI for a repaint.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

pub struct NativeDriver {
    commands: Sender<Command>,
    events: Receiver<DriverEvent>,
    pump: Option<JoinHandle<()>>,
}

impl NativeDriver {
    /// Starts the pump thread; nothing is loaded until a `Load` command.
    pub fn start(waker: Waker) -> anyhow::Result<NativeDriver> {
        let (commands, command_rx) = channel();
        let (event_tx, events) = channel();
        let pump = std::thread::Builder::new()
            .name("lynx-viewer-driver".into())
            .spawn(move || Pump::new(event_tx, waker).run(command_rx))
            .context("failed to start the driver thread")?;
        Ok(NativeDriver {
            commands,
            events,
            pump: Some(pump),
        })
    }

    /// The model loaded when the user names none.
    pub fn default_model() -> Option<PathBuf> {
        lynx::loader::default_model_path().ok()
    }
}

impl Driver for NativeDriver {
    fn send(&mut self, command: Command) {
        // The pump only stops when this driver is dropped.
        let _ = self.commands.send(command);
    }

    fn poll(&mut self) -> Vec<DriverEvent> {
        self.events.try_iter().collect()
    }
}

impl Drop for NativeDriver {
    fn drop(&mut self) {
        // Closing the command channel ends the pump, which shuts the
        // scheduler down and joins it.
        let (dead, _) = channel();
        self.commands = dead;
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}

/// A loaded model and the thread that serves it.
struct Session {
    gpu: Arc<GpuModel>,
    tokenizer: Arc<Tokenizer>,
    scheduler: Arc<Scheduler>,
    runner: Option<JoinHandle<()>>,
    metrics: Receiver<Arc<StepMetrics>>,
    handles: HashMap<RequestId, RequestHandle>,
}

impl Session {
    fn shutdown(&mut self) {
        self.scheduler.shutdown();
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Pump {
    events: Sender<DriverEvent>,
    waker: Waker,
    last_wake: Instant,
    /// Events were sent since the last wake.
    dirty: bool,
    session: Option<Session>,
    last_stats: Option<lynx::serving::SchedulerStats>,
}

impl Pump {
    fn new(events: Sender<DriverEvent>, waker: Waker) -> Pump {
        Pump {
            events,
            waker,
            last_wake: Instant::now(),
            dirty: false,
            session: None,
            last_stats: None,
        }
    }

    fn emit(&mut self, e: DriverEvent) {
        let _ = self.events.send(e);
        self.dirty = true;
    }

    /// Wakes the UI now (for events a person waits for, like a finished load).
    fn wake_now(&mut self) {
        (self.waker)();
        self.last_wake = Instant::now();
        self.dirty = false;
    }

    fn run(mut self, commands: Receiver<Command>) {
        loop {
            let busy = self.session.as_ref().is_some_and(|s| !s.handles.is_empty());
            let timeout = if busy {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(50)
            };
            match commands.recv_timeout(timeout) {
                Ok(c) => {
                    self.handle(c);
                    // Take everything queued so that a burst of commands costs one pass.
                    loop {
                        match commands.try_recv() {
                            Ok(c) => self.handle(c),
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => return,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.forward();
            if self.dirty && self.last_wake.elapsed() >= WAKE_INTERVAL {
                self.wake_now();
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Load { path } => self.load(path),
            Command::Submit(batch) => self.submit(batch),
            Command::Stop(id) => {
                // Dropping the handle cancels the request in the scheduler.
                if let Some(s) = &mut self.session {
                    s.handles.remove(&id);
                }
            }
            Command::SetPolicy(p) => {
                let r = match &self.session {
                    // Checked against the model, then the serving loop
                    // applies it from its next decode step.
                    Some(s) => p
                        .resolve_for(&s.gpu.config)
                        .map(|_| s.scheduler.set_policy(p))
                        .map_err(|e| e.to_string()),
                    None => Err("no model is loaded".into()),
                };
                match r {
                    Ok(()) => self.emit(DriverEvent::PolicyApplied(p)),
                    Err(e) => self.emit(DriverEvent::PolicyRejected(format!("policy `{p}`: {e}"))),
                }
            }
            Command::ReadDocument { path } => {
                let e = match read_document(Path::new(&path)) {
                    Ok(text) => DriverEvent::Document { path, text },
                    Err(e) => DriverEvent::DocumentFailed(format!("{e:#}")),
                };
                self.emit(e);
                self.wake_now();
            }
        }
    }

    fn load(&mut self, path: Option<String>) {
        // The old model's requests end with an error as its scheduler stops.
        if let Some(mut old) = self.session.take() {
            old.shutdown();
            let mut out = Vec::new();
            for (id, h) in old.handles.drain() {
                replaced(id, &h, &mut out);
            }
            for e in out {
                self.emit(e);
            }
        }
        let r = self.load_session(path);
        match r {
            Ok((session, info)) => {
                self.session = Some(session);
                self.emit(DriverEvent::Loaded(info));
            }
            Err(e) => self.emit(DriverEvent::LoadFailed(format!("{e:#}"))),
        }
        self.wake_now();
    }

    fn load_session(&mut self, path: Option<String>) -> anyhow::Result<(Session, ModelInfo)> {
        let path = match path {
            Some(p) => PathBuf::from(p),
            None => lynx::loader::default_model_path().context("no default model")?,
        };
        self.emit(DriverEvent::LoadProgress(LoadPhase::Reading));
        self.wake_now();
        let mut lm = lynx::load(&path).with_context(|| format!("failed to load model {}", path.display()))?;
        let tokenizer = lm
            .tokenizer
            .take()
            .ok_or_else(|| anyhow!("model {} has no tokenizer, so it cannot chat", path.display()))?;
        self.emit(DriverEvent::LoadProgress(LoadPhase::OpeningGpu));
        self.wake_now();
        let ctx = GpuContext::new(GpuOptions::from_env()).context("could not open a GPU")?;
        let adapter = ctx.adapter_report();
        let events = self.events.clone();
        let waker = self.waker.clone();
        let mut last = Instant::now();
        let gpu = GpuModel::upload(Arc::new(ctx), &lm.model, |done, total| {
            let _ = events.send(DriverEvent::LoadProgress(LoadPhase::Uploading { done, total }));
            if last.elapsed() >= WAKE_INTERVAL || done == total {
                waker();
                last = Instant::now();
            }
        })
        .with_context(|| format!("failed to upload {} to the GPU", path.display()))?;
        let gpu = Arc::new(gpu);
        let info = ModelInfo::new(path.display().to_string(), &gpu.config, &tokenizer, adapter);
        let metrics = gpu.subscribe();
        let scheduler = Arc::new(
            Scheduler::new(SchedulerConfig {
                max_batch: MAX_BATCH,
                max_queue: 256,
            })
            .context("scheduler settings")?,
        );
        let tokenizer = Arc::new(tokenizer);
        let runner = {
            let (gpu, tokenizer, scheduler) = (gpu.clone(), tokenizer.clone(), scheduler.clone());
            std::thread::Builder::new()
                .name("lynx-viewer-scheduler".into())
                .spawn(move || scheduler.run(&*gpu, &tokenizer))
                .context("failed to start the scheduler thread")?
        };
        let session = Session {
            gpu,
            tokenizer,
            scheduler,
            runner: Some(runner),
            metrics,
            handles: HashMap::new(),
        };
        Ok((session, info))
    }

    fn submit(&mut self, batch: Vec<Submission>) {
        let mut out = Vec::new();
        match &mut self.session {
            Some(s) => submit_all(&s.scheduler, &s.tokenizer, batch, &mut s.handles, &mut out),
            None => out.extend(batch.into_iter().map(|sub| DriverEvent::Failed {
                id: sub.id,
                error: "no model is loaded".into(),
            })),
        }
        for e in out {
            self.emit(e);
        }
    }

    /// Forwards what every request and the metrics stream produced.
    fn forward(&mut self) {
        let Some(s) = &mut self.session else { return };
        let mut out = Vec::new();
        drain_requests(&mut s.handles, &mut out);
        out.extend(s.metrics.try_iter().map(DriverEvent::Metrics));
        let stats = s.scheduler.stats();
        if self.last_stats != Some(stats) {
            self.last_stats = Some(stats);
            out.push(DriverEvent::Stats(stats));
        }
        for e in out {
            self.emit(e);
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(mut s) = self.session.take() {
            s.shutdown();
        }
    }
}

fn read_document(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > MAX_DOCUMENT_BYTES {
        return Err(anyhow!(
            "{} is {} KiB; the QA mode reads documents of up to {} KiB",
            path.display(),
            meta.len() / 1024,
            MAX_DOCUMENT_BYTES / 1024
        ));
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{} is not UTF-8 text", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_document_names_the_file_on_error() {
        let dir = std::env::temp_dir().join(format!("lynx-viewer-doc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("doc.txt");
        std::fs::write(&good, "Lynx runs MoE models.").expect("write");
        assert_eq!(read_document(&good).expect("read"), "Lynx runs MoE models.");
        let missing = dir.join("missing.txt");
        let e = format!("{:#}", read_document(&missing).expect_err("missing file"));
        assert!(e.contains("missing.txt"), "{e}");
        let binary = dir.join("bin.dat");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        let e = format!("{:#}", read_document(&binary).expect_err("not text"));
        assert!(e.contains("not UTF-8"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
