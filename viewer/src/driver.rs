//! The interface between the UI and whatever runs the model.
//!
//! The UI never calls the runtime directly: it sends [`Command`]s and
//! drains [`DriverEvent`]s once per frame. The native driver
//! (`native::NativeDriver`) runs the serving loop on std threads; the
//! browser build (`lynx-web`'s `viewer` module) runs the same loop on the
//! page's event loop over WebGPU futures; the tests implement it with a
//! scripted fake. Nothing here blocks. The helpers at the end are shared by
//! both real drivers.

use std::sync::{Arc, Mutex};

use lynx::config::ModelConfig;
use lynx::generate::{FinishReason, GenerateOptions};
use lynx::metrics::StepMetrics;
use lynx::selection::ExpertPolicy;
use std::collections::HashMap;
use std::sync::mpsc::TryRecvError;

use lynx::serving::SchedulerStats;
use lynx::serving::{Event, RequestHandle, Scheduler};
use lynx::{ChatMessage, Tokenizer};

/// The UI's name for a request, chosen by the UI so that events can be
/// matched to conversations before the scheduler has seen the request.
pub type RequestId = u64;

/// One generation request: a conversation rendered with the model's chat
/// template, with its own sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Submission {
    pub id: RequestId,
    pub messages: Vec<ChatMessage>,
    pub options: GenerateOptions,
}

/// What the UI asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Load a model (a `.gguf` file or a checkpoint directory), replacing
    /// the current one; `None` loads the default (demo) model.
    Load { path: Option<String> },
    /// Start these requests together, so that they decode as one batch.
    Submit(Vec<Submission>),
    /// Cancel a request; its batch slot is freed before the next step.
    Stop(RequestId),
    /// Use this expert-selection policy from the next decode step on.
    SetPolicy(ExpertPolicy),
    /// Read a text document (for batch document QA).
    ReadDocument { path: String },
}

/// The phases of loading a model, for the progress bar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadPhase {
    /// Receiving the file over the network or from a file picker (the
    /// browser), `received` of `total` bytes; its weights go to the GPU as
    /// they arrive.
    Downloading { received: usize, total: usize },
    /// Parsing the file and its tokenizer (no finer progress is known).
    Reading,
    /// Opening the GPU adapter.
    OpeningGpu,
    /// Uploading weights: `done` of `total` layers.
    Uploading { done: usize, total: usize },
}

impl LoadPhase {
    /// The fraction of the whole load that is done, for a progress bar.
    /// Reading and opening the GPU are short next to the upload, so they
    /// take the first tenth of the bar.
    pub fn fraction(&self) -> f32 {
        match *self {
            LoadPhase::Downloading { received, total } => received as f32 / total.max(1) as f32,
            LoadPhase::Reading => 0.02,
            LoadPhase::OpeningGpu => 0.08,
            LoadPhase::Uploading { done, total } => 0.1 + 0.9 * (done as f32 / total.max(1) as f32),
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            LoadPhase::Downloading { received, total } => format!(
                "receiving and uploading: {:.1} of {:.1} MiB",
                received as f64 / (1 << 20) as f64,
                total as f64 / (1 << 20) as f64
            ),
            LoadPhase::Reading => "reading the model file and tokenizer".into(),
            LoadPhase::OpeningGpu => "opening the GPU".into(),
            LoadPhase::Uploading { done, total } => format!("uploading weights: layer {done}/{total}"),
        }
    }
}

/// What the UI needs to know about a loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub path: String,
    /// Architecture and size, e.g. `Mixtral, 30 layers, 16 experts top-8`.
    pub description: String,
    pub num_layers: usize,
    /// E and K; `None` for a dense model (no expert selection).
    pub experts: Option<(usize, usize)>,
    pub has_chat_template: bool,
    /// The GPU adapter, as the runtime reports it.
    pub adapter: String,
    pub context_length: usize,
}

impl ModelInfo {
    /// The UI's summary of a model that was loaded from `path` and runs on
    /// `adapter`.
    pub fn new(path: String, cfg: &ModelConfig, tokenizer: &Tokenizer, adapter: String) -> ModelInfo {
        ModelInfo {
            path,
            description: match &cfg.moe {
                Some(m) => format!(
                    "{}, {} layers, {} experts top-{}",
                    cfg.arch.name(),
                    cfg.num_layers,
                    m.num_experts,
                    m.top_k
                ),
                None => format!("{}, {} layers, dense", cfg.arch.name(), cfg.num_layers),
            },
            num_layers: cfg.num_layers,
            experts: cfg.moe.as_ref().map(|m| (m.num_experts, m.top_k)),
            has_chat_template: tokenizer.chat_template().is_some(),
            adapter,
            context_length: cfg.max_position_embeddings,
        }
    }
}

/// How a request ended, as the UI shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish: FinishReason,
    /// Seconds from submission to the first token, and to the end.
    pub first_token_s: f64,
    pub total_s: f64,
}

/// What the driver reports back.
#[derive(Clone, Debug)]
pub enum DriverEvent {
    LoadProgress(LoadPhase),
    Loaded(ModelInfo),
    LoadFailed(String),
    /// The request's prompt was prefilled.
    Started {
        id: RequestId,
        prompt_tokens: usize,
    },
    Text {
        id: RequestId,
        delta: String,
    },
    Done {
        id: RequestId,
        finished: Finished,
    },
    Failed {
        id: RequestId,
        error: String,
    },
    /// One forward step's routing metrics.
    Metrics(Arc<StepMetrics>),
    Stats(SchedulerStats),
    /// The policy now in force (after a `SetPolicy`, or a model load).
    PolicyApplied(ExpertPolicy),
    PolicyRejected(String),
    Document {
        path: String,
        text: String,
    },
    DocumentFailed(String),
}

/// Something that runs the model for the UI.
pub trait Driver {
    fn send(&mut self, command: Command);
    /// Every event since the last call, oldest first; never blocks.
    fn poll(&mut self) -> Vec<DriverEvent>;
}

/// A driver that runs nothing: it records the commands it is sent and
/// returns the events queued with [`RecordingDriver::push`]. Clones share
/// one record, so a test keeps a clone while the app owns the other. Tests
/// and fixed-state renders use it.
#[derive(Clone, Default)]
pub struct RecordingDriver {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    sent: Vec<Command>,
    queued: Vec<DriverEvent>,
}

impl RecordingDriver {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // The record is plain data; a test that panicked mid-push leaves it usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event for the next `poll`.
    pub fn push(&self, event: DriverEvent) {
        self.lock().queued.push(event);
    }

    /// Every command sent so far, oldest first.
    pub fn sent(&self) -> Vec<Command> {
        self.lock().sent.clone()
    }
}

impl Driver for RecordingDriver {
    fn send(&mut self, command: Command) {
        self.lock().sent.push(command);
    }

    fn poll(&mut self) -> Vec<DriverEvent> {
        std::mem::take(&mut self.lock().queued)
    }
}

/// A serving-loop event of request `id`, as the UI's event.
pub fn convert(id: RequestId, e: Event) -> DriverEvent {
    match e {
        Event::Started { prompt_tokens } => DriverEvent::Started { id, prompt_tokens },
        Event::Text(delta) => DriverEvent::Text { id, delta },
        Event::Done(c) => DriverEvent::Done {
            id,
            finished: Finished {
                prompt_tokens: c.prompt_tokens,
                generated_tokens: c.tokens.len(),
                finish: c.finish,
                first_token_s: c.first_token_s,
                total_s: c.total_s,
            },
        },
        Event::Error(error) => DriverEvent::Failed { id, error },
    }
}

/// Appends every event the requests in `handles` produced since the last
/// call to `out`, and forgets the requests that ended.
pub fn drain_requests(handles: &mut HashMap<RequestId, RequestHandle>, out: &mut Vec<DriverEvent>) {
    let mut ended = Vec::new();
    for (&id, h) in handles.iter() {
        loop {
            match h.try_recv() {
                Ok(e) => {
                    let last = matches!(e, Event::Done(_) | Event::Error(_));
                    out.push(convert(id, e));
                    if last {
                        ended.push(id);
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    out.push(DriverEvent::Failed {
                        id,
                        error: "the serving loop stopped".into(),
                    });
                    ended.push(id);
                    break;
                }
            }
        }
    }
    for id in ended {
        handles.remove(&id);
    }
}

/// The text a request streamed before its model was replaced, then its
/// failure: what the UI gets for each request of an unloaded model.
pub fn replaced(id: RequestId, h: &RequestHandle, out: &mut Vec<DriverEvent>) {
    while let Ok(e) = h.try_recv() {
        if matches!(e, Event::Text(_) | Event::Started { .. }) {
            out.push(convert(id, e));
        }
    }
    out.push(DriverEvent::Failed {
        id,
        error: "the model was replaced".into(),
    });
}

/// Queues `batch` on `scheduler` and records each request's handle in
/// `handles`; a request that cannot be tokenized or queued gets a `Failed`
/// event in `out`. Every prompt is tokenized first and then all are queued
/// in one `submit_batch`, so that the loop admits them in the same
/// iteration: they are prefilled together and decode as one batch.
pub fn submit_all(
    scheduler: &Scheduler,
    tok: &Tokenizer,
    batch: Vec<Submission>,
    handles: &mut HashMap<RequestId, RequestHandle>,
    out: &mut Vec<DriverEvent>,
) {
    let mut prompts = Vec::with_capacity(batch.len());
    let mut ids = Vec::with_capacity(batch.len());
    for sub in batch {
        match tok.encode_chat(&sub.messages) {
            Ok(p) => {
                ids.push(sub.id);
                prompts.push((p, sub.options));
            }
            Err(error) => out.push(DriverEvent::Failed {
                id: sub.id,
                error: format!("{error:#}"),
            }),
        }
    }
    for (id, r) in ids.into_iter().zip(scheduler.submit_batch(prompts)) {
        match r {
            Ok(h) => {
                handles.insert(id, h);
            }
            Err(e) => out.push(DriverEvent::Failed {
                id,
                error: e.to_string(),
            }),
        }
    }
}
