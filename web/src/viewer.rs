//! The desktop viewer's egui app in the browser: [`WebDriver`] implements
//! the viewer's `Driver` on the page's event loop, and [`start`] mounts
//! `lynx_viewer::ViewerApp` on a canvas with eframe's web runner.
//!
//! The driver does what the native one does (`lynx_viewer::native`), with
//! the browser's means: models are fetched (or picked) and streamed into GPU
//! buffers as they arrive (`crate::read_model`); the runtime's serving loop
//! runs as a task on the event loop (`Scheduler::run_async`), awaiting each
//! forward pass and yielding between steps, so the page keeps drawing while
//! the batch decodes. Conversations sent together are prefilled together
//! and decode as one batch; one sent later joins the running batch.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use eframe::egui;
use lynx::metrics::StepMetrics;
use lynx::serving::{RequestHandle, Scheduler, SchedulerConfig, SchedulerStats};
use lynx_viewer::ViewerApp;
use lynx_viewer::driver::{
    Command, Driver, DriverEvent, LoadPhase, ModelInfo, RequestId, Submission, drain_requests, replaced, submit_all,
};
use lynx_viewer::script::{Script, ScriptKind};
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::session::{Backend, Engine, Loaded};

/// The most sequences decoded together, as in the native viewer.
const MAX_BATCH: usize = 32;
/// The biggest document the QA mode fetches.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// How long the serving loop sleeps when it has nothing to do. It is only
/// woken by time (submitting does not wake it), so this bounds the delay
/// before a new request starts.
const IDLE_MS: i32 = 30;

/// One loaded model and its serving loop.
struct Session {
    loaded: Rc<Loaded>,
    scheduler: Arc<Scheduler>,
    metrics: Option<Receiver<Arc<StepMetrics>>>,
    handles: HashMap<RequestId, RequestHandle>,
}

impl Session {
    fn shutdown(&mut self) {
        self.scheduler.shutdown();
    }
}

struct Inner {
    backend: Rc<Backend>,
    /// What `Load { path: None }` fetches.
    default_url: String,
    events: Vec<DriverEvent>,
    session: Option<Session>,
    last_stats: Option<SchedulerStats>,
    /// Bumped by every load, so that a slower earlier load that finishes
    /// late does not replace the newer model.
    generation: u64,
    ctx: egui::Context,
}

/// The viewer's driver in the browser. Clones share one state.
#[derive(Clone)]
pub struct WebDriver {
    inner: Rc<RefCell<Inner>>,
}

impl WebDriver {
    pub fn new(backend: Rc<Backend>, default_url: String, ctx: egui::Context) -> WebDriver {
        WebDriver {
            inner: Rc::new(RefCell::new(Inner {
                backend,
                default_url,
                events: Vec::new(),
                session: None,
                last_stats: None,
                generation: 0,
                ctx,
            })),
        }
    }

    fn emit(&self, e: DriverEvent) {
        let mut inner = self.inner.borrow_mut();
        inner.events.push(e);
        inner.ctx.request_repaint();
    }

    /// Ends the current model's requests and its loop, before a new load.
    fn unload(&self) {
        let old = self.inner.borrow_mut().session.take();
        if let Some(mut s) = old {
            s.shutdown();
            let mut out = Vec::new();
            for (id, h) in s.handles.drain() {
                replaced(id, &h, &mut out);
            }
            for e in out {
                self.emit(e);
            }
        }
    }

    /// Loads a model from `url`, or from the file the visitor picked.
    fn load(&self, source: Source) {
        self.unload();
        let generation = {
            let mut inner = self.inner.borrow_mut();
            inner.generation += 1;
            inner.generation
        };
        let this = self.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let backend = this.inner.borrow().backend.clone();
            let progress = |received: usize, total: usize| {
                this.emit(DriverEvent::LoadProgress(LoadPhase::Downloading { received, total }));
            };
            let (name, result) = match &source {
                Source::Url(url) => {
                    let r = match crate::fetch_stream(url).await {
                        Ok((stream, total)) => crate::read_model(&backend, stream, url, total, progress).await,
                        Err(e) => Err(e),
                    };
                    (url.clone(), r)
                }
                Source::File(file) => {
                    let name = file.name();
                    let total = file.size() as usize;
                    let r = crate::read_model(&backend, file.stream(), &name, total, progress).await;
                    (name, r)
                }
            };
            if this.inner.borrow().generation != generation {
                return; // A newer load has started; this model is dropped.
            }
            match result {
                Ok(loaded) => this.start_session(name, loaded),
                Err(e) => this.emit(DriverEvent::LoadFailed(e)),
            }
        });
    }

    fn start_session(&self, name: String, loaded: Loaded) {
        let adapter = match &*self.inner.borrow().backend {
            Backend::Gpu(ctx) => ctx.adapter_report(),
            Backend::Cpu { .. } => "the CPU reference in wasm (no WebGPU)".into(),
        };
        let (cfg, metrics) = match &loaded.engine {
            Engine::Gpu(g) => (&g.config, Some(g.subscribe())),
            Engine::Cpu(m) => (&m.config, None),
        };
        let info = ModelInfo::new(name, cfg, &loaded.tokenizer, adapter);
        let scheduler = match Scheduler::new(SchedulerConfig {
            max_batch: MAX_BATCH,
            max_queue: 256,
        }) {
            Ok(s) => Arc::new(s),
            Err(e) => return self.emit(DriverEvent::LoadFailed(format!("scheduler settings: {e}"))),
        };
        let loaded = Rc::new(loaded);
        {
            let (loaded, scheduler) = (loaded.clone(), scheduler.clone());
            wasm_bindgen_futures::spawn_local(async move {
                let pause = |busy: bool| crate::sleep_ms(if busy { 0 } else { IDLE_MS });
                match &loaded.engine {
                    Engine::Gpu(g) => scheduler.run_async(g, &loaded.tokenizer, pause).await,
                    Engine::Cpu(m) => scheduler.run_async(m, &loaded.tokenizer, pause).await,
                }
            });
        }
        self.inner.borrow_mut().session = Some(Session {
            loaded,
            scheduler,
            metrics,
            handles: HashMap::new(),
        });
        self.emit(DriverEvent::Loaded(info));
    }

    fn submit(&self, batch: Vec<Submission>) {
        let mut out = Vec::new();
        match &mut self.inner.borrow_mut().session {
            Some(s) => submit_all(&s.scheduler, &s.loaded.tokenizer, batch, &mut s.handles, &mut out),
            None => out.extend(batch.into_iter().map(|sub| DriverEvent::Failed {
                id: sub.id,
                error: "no model is loaded".into(),
            })),
        }
        for e in out {
            self.emit(e);
        }
    }

    fn set_policy(&self, p: lynx::selection::ExpertPolicy) {
        let r = match &self.inner.borrow().session {
            None => Err("no model is loaded".to_string()),
            Some(s) => match &s.loaded.engine {
                // Checked against the model, then the serving loop applies
                // it from its next decode step.
                Engine::Gpu(g) => p
                    .resolve_for(&g.config)
                    .map(|_| s.scheduler.set_policy(p))
                    .map_err(|e| e.to_string()),
                Engine::Cpu(_) => {
                    Err("expert selection needs WebGPU; the CPU reference reports no expert metrics to show".into())
                }
            },
        };
        match r {
            Ok(()) => self.emit(DriverEvent::PolicyApplied(p)),
            Err(e) => self.emit(DriverEvent::PolicyRejected(format!("policy `{p}`: {e}"))),
        }
    }

    /// Fetches a text document for the QA mode (in the browser, a path is
    /// an address relative to the page).
    fn read_document(&self, path: String) {
        let this = self.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let e = match crate::fetch_text(&path, MAX_DOCUMENT_BYTES).await {
                Ok(text) => DriverEvent::Document { path, text },
                Err(e) => DriverEvent::DocumentFailed(e),
            };
            this.emit(e);
        });
    }

    /// Forwards what every request and the metrics stream produced.
    fn forward(&self) {
        let mut out = Vec::new();
        {
            let mut inner = self.inner.borrow_mut();
            let inner = &mut *inner;
            let Some(s) = &mut inner.session else { return };
            drain_requests(&mut s.handles, &mut out);
            if let Some(m) = &s.metrics {
                out.extend(m.try_iter().map(DriverEvent::Metrics));
            }
            let stats = s.scheduler.stats();
            if inner.last_stats != Some(stats) {
                inner.last_stats = Some(stats);
                out.push(DriverEvent::Stats(stats));
            }
        }
        self.inner.borrow_mut().events.extend(out);
    }
}

enum Source {
    Url(String),
    File(web_sys::File),
}

impl Driver for WebDriver {
    fn send(&mut self, command: Command) {
        match command {
            Command::Load { path } => {
                let url = path.unwrap_or_else(|| self.inner.borrow().default_url.clone());
                self.load(Source::Url(url));
            }
            Command::Submit(batch) => self.submit(batch),
            Command::Stop(id) => {
                // Dropping the handle cancels the request; its slot is
                // freed before the next step.
                if let Some(s) = &mut self.inner.borrow_mut().session {
                    s.handles.remove(&id);
                }
            }
            Command::SetPolicy(p) => self.set_policy(p),
            Command::ReadDocument { path } => self.read_document(path),
        }
    }

    fn poll(&mut self) -> Vec<DriverEvent> {
        self.forward();
        std::mem::take(&mut self.inner.borrow_mut().events)
    }
}

/// What the page (and the browser test) can read of the app: the model's
/// state, every reply, and a script's outcome.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
struct Snapshot {
    /// `not loaded`, `loading: ...`, `ready`, or `failed: ...`.
    model: String,
    adapter: String,
    replies: Vec<Reply>,
    decode_steps: u64,
    max_batch: usize,
    /// The script's exit code once it has finished (0 is success).
    script_exit: Option<i32>,
    script_report: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
struct Reply {
    /// The tab's title and the user's last message.
    conversation: String,
    prompt: String,
    text: String,
    /// `queued`, `streaming`, `done`, `stopped` or `failed: ...`.
    status: String,
    generated_tokens: usize,
}

fn snapshot(app: &ViewerApp) -> Snapshot {
    use lynx_viewer::state::{ModelStatus, ReplyStatus, Role};
    let s = &app.state;
    let (model, adapter) = match &s.model {
        ModelStatus::NotLoaded => ("not loaded".to_string(), String::new()),
        ModelStatus::Loading { phase, .. } => (format!("loading: {}", phase.describe()), String::new()),
        ModelStatus::Ready(info) => ("ready".to_string(), info.adapter.clone()),
        ModelStatus::Failed(e) => (format!("failed: {e}"), String::new()),
    };
    let mut replies = Vec::new();
    for c in &s.conversations {
        let mut prompt = String::new();
        for m in &c.messages {
            match m.role {
                Role::User => prompt = m.text.clone(),
                Role::Assistant => {
                    let (status, generated_tokens) = match &m.status {
                        Some(ReplyStatus::Queued) => ("queued".to_string(), 0),
                        Some(ReplyStatus::Streaming) => ("streaming".to_string(), 0),
                        Some(ReplyStatus::Done(f)) => ("done".to_string(), f.generated_tokens),
                        Some(ReplyStatus::Stopped) => ("stopped".to_string(), 0),
                        Some(ReplyStatus::Failed(e)) => (format!("failed: {e}"), 0),
                        None => (String::new(), 0),
                    };
                    replies.push(Reply {
                        conversation: c.title.clone(),
                        prompt: prompt.clone(),
                        text: m.text.clone(),
                        status,
                        generated_tokens,
                    });
                }
            }
        }
    }
    Snapshot {
        model,
        adapter,
        replies,
        decode_steps: s.metrics.decode_steps,
        max_batch: s.metrics.max_batch,
        script_exit: app.exit_code.lock().ok().and_then(|c| *c),
        script_report: app.script_report().to_vec(),
    }
}

/// The viewer app plus the snapshot the page reads.
struct WebApp {
    app: ViewerApp,
    snapshot: Rc<RefCell<String>>,
    last: Snapshot,
}

impl eframe::App for WebApp {
    fn logic(&mut self, _ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.app.poll_driver();
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.app.frame(ui);
        let now = snapshot(&self.app);
        if now != self.last {
            *self.snapshot.borrow_mut() = serde_json::to_string(&now).unwrap_or_default();
            self.last = now;
        }
    }
}

/// Options of [`start`], from the page's address.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
struct StartOptions {
    /// The demo model's address.
    model_url: String,
    /// Load the demo model at once (the page's `?autoload`).
    autoload: bool,
    /// Run the scripted exchange (`chat` or `docqa`), as the native
    /// viewer's `--script` does.
    script: Option<String>,
    /// Tokens per reply in the script.
    max_tokens: Option<usize>,
    /// Switch the script to Lynx halfway (default on).
    switch_to_lynx: Option<bool>,
    /// Use the CPU reference even where WebGPU exists.
    force_cpu: bool,
}

/// The running viewer, as JavaScript sees it.
#[wasm_bindgen]
pub struct Viewer {
    runner: eframe::WebRunner,
    driver: WebDriver,
    snapshot: Rc<RefCell<String>>,
    backend: Rc<Backend>,
}

#[wasm_bindgen]
impl Viewer {
    /// The app's state as JSON (see `Snapshot`), for the page and tests.
    pub fn snapshot(&self) -> String {
        self.snapshot.borrow().clone()
    }

    /// The model backend as JSON (`session::BackendInfo`).
    pub fn backend(&self) -> String {
        serde_json::to_string(&self.backend.info()).unwrap_or_default()
    }

    /// Loads a file the visitor picked, streamed as the demo page does.
    #[wasm_bindgen(js_name = loadFile)]
    pub fn load_file(&self, file: web_sys::File) {
        // The UI learns of the load from the driver's progress events.
        self.driver.load(Source::File(file));
    }

    /// Why the app stopped, if it panicked.
    #[wasm_bindgen(js_name = panicMessage)]
    pub fn panic_message(&self) -> Option<String> {
        self.runner.panic_summary().map(|p| p.message())
    }
}

/// Mounts the viewer on the canvas with id `canvas_id`. `options` is JSON
/// (`StartOptions`). Resolves to a [`Viewer`]; rejects with a message when
/// the page cannot draw (no WebGPU for the canvas).
#[wasm_bindgen(js_name = startViewer)]
pub async fn start(canvas_id: String, options: String) -> Result<Viewer, JsValue> {
    crate::install_panic_hook();
    // eframe and wgpu report problems (a surface that cannot be configured,
    // say) through `log`; without a logger the canvas would just stay blank.
    let _ = eframe::WebLogger::init(log::LevelFilter::Debug);
    let opts: StartOptions =
        serde_json::from_str(&options).map_err(|e| crate::js_err(format!("bad viewer options: {e}")))?;
    let document = web_sys::window()
        .and_then(|w| w.document())
        .ok_or_else(|| crate::js_err("no document"))?;
    let canvas: web_sys::HtmlCanvasElement = document
        .get_element_by_id(&canvas_id)
        .ok_or_else(|| crate::js_err(format!("no element #{canvas_id}")))?
        .dyn_into()
        .map_err(|_| crate::js_err(format!("#{canvas_id} is not a canvas")))?;
    let backend = Rc::new(Backend::open(opts.force_cpu, crate::has_webgpu()).await);
    let snapshot = Rc::new(RefCell::new(String::new()));
    let driver_slot: Rc<RefCell<Option<WebDriver>>> = Rc::new(RefCell::new(None));
    // The app draws with WebGL and leaves WebGPU to the model: a WebGPU
    // canvas shows nothing in headless Chromium on SwiftShader (the
    // browser test's), and WebGL also draws where the browser has no
    // WebGPU and the model runs on the CPU.
    let web_options = eframe::WebOptions {
        renderer: eframe::Renderer::Glow,
        ..Default::default()
    };
    let runner = eframe::WebRunner::new();
    {
        let (backend, snapshot, driver_slot) = (backend.clone(), snapshot.clone(), driver_slot.clone());
        runner
            .start(
                canvas,
                web_options,
                Box::new(move |cc| {
                    ViewerApp::setup(&cc.egui_ctx);
                    let driver = WebDriver::new(backend, opts.model_url.clone(), cc.egui_ctx.clone());
                    driver_slot.replace(Some(driver.clone()));
                    let mut app = ViewerApp::new(Box::new(driver));
                    app.state.default_model = opts.model_url.clone();
                    if let Some(kind) = &opts.script {
                        let kind: ScriptKind = kind.parse()?;
                        let mut script = Script::new(kind, opts.max_tokens.unwrap_or(12));
                        script.switch_to_lynx = opts.switch_to_lynx.unwrap_or(true);
                        // The browser test takes the page's screenshot itself;
                        // the script's capture only has to happen.
                        app = app.with_script(
                            script,
                            Box::new(|img| {
                                Ok(format!(
                                    "{}x{} frame captured in the browser",
                                    img.width(),
                                    img.height()
                                ))
                            }),
                        );
                    } else if opts.autoload {
                        app.state.load_model();
                    }
                    Ok(Box::new(WebApp {
                        app,
                        snapshot,
                        last: Snapshot::default(),
                    }))
                }),
            )
            .await
            .map_err(|e| crate::js_err(format!("the viewer could not start: {}", crate::describe(&e))))?;
    }
    let driver = driver_slot
        .borrow_mut()
        .take()
        .ok_or_else(|| crate::js_err("the viewer app was not created"))?;
    Ok(Viewer {
        runner,
        driver,
        snapshot,
        backend,
    })
}
