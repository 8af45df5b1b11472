//! `lynx-web`: the Lynx runtime in the browser. Built for
//! `wasm32-unknown-unknown` with wgpu's WebGPU backend (`web/build.sh`); on
//! native targets the crate is empty.
//!
//! - [`session`]: the UI-independent demo driver (backend choice, streamed
//!   model loading, step-by-step batched generation with expert metrics).
//! - [`viewer`]: the desktop viewer's egui app on a canvas (`index.html`),
//!   driven by the runtime's serving loop on the page's event loop.
//! - this file: the JavaScript surface of the light page ([`Demo`], which
//!   `lite.js` calls), and the glue between JS streams and promises and
//!   the runtime that both pages use.
//!
//! The light page calls `Demo.create()`, then `loadUrl` or `loadFile`, then
//! `generate`; every long call returns a promise and reports progress
//! through a callback, so the page stays responsive.

#![cfg(target_arch = "wasm32")]

pub mod session;
pub mod viewer;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use js_sys::{Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};

use crate::session::{Backend, Event, Loaded, ModelLoad, Request};

/// Panics become console errors with their message, instead of an opaque
/// "unreachable" trap.
pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            web_sys::console::error_1(&format!("lynx-web panicked: {info}").into());
        }));
    });
}

pub(crate) fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsValue::from(js_sys::Error::new(&e.to_string()))
}

struct State {
    backend: Backend,
    loaded: RefCell<Option<Rc<Loaded>>>,
    /// Set while a load or a generation runs: the GPU engine takes one
    /// forward pass at a time, and the page's buttons respect this too.
    busy: Cell<bool>,
}

/// Clears `busy` when the call that set it ends, however it ends.
struct BusyGuard(Rc<State>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.set(false);
    }
}

fn claim(state: &Rc<State>) -> Result<BusyGuard, JsValue> {
    if state.busy.replace(true) {
        return Err(js_err("busy: a model load or a generation is already running"));
    }
    Ok(BusyGuard(state.clone()))
}

/// The demo, as JavaScript sees it.
#[wasm_bindgen]
pub struct Demo {
    state: Rc<State>,
}

#[wasm_bindgen]
impl Demo {
    /// Opens WebGPU (or the CPU fallback when the browser has none, or when
    /// `force_cpu`). Resolves to a `Demo`.
    pub async fn create(force_cpu: bool) -> Result<Demo, JsValue> {
        install_panic_hook();
        let backend = Backend::open(force_cpu, has_webgpu()).await;
        Ok(Demo {
            state: Rc::new(State {
                backend,
                loaded: RefCell::new(None),
                busy: Cell::new(false),
            }),
        })
    }

    /// The backend as JSON (`session::BackendInfo`).
    pub fn backend(&self) -> String {
        serde_json::to_string(&self.state.backend.info()).unwrap_or_default()
    }

    /// The loaded model as JSON (`session::ModelInfo`), or `null`.
    pub fn model(&self) -> String {
        match self.state.loaded.borrow().as_ref() {
            Some(l) => serde_json::to_string(&l.info()).unwrap_or_default(),
            None => "null".into(),
        }
    }

    /// Fetches `url` and loads it, calling `on_progress(received, total)`
    /// as bytes arrive. The body is read as a stream; on WebGPU every chunk
    /// goes to the GPU buffers as it comes.
    #[wasm_bindgen(js_name = loadUrl)]
    pub fn load_url(&self, url: String, on_progress: Function) -> Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let _busy = claim(&state)?;
            let (body, total) = fetch_stream(&url).await.map_err(js_err)?;
            let name = url.rsplit('/').next().unwrap_or(&url).to_string();
            load_stream(&state, body, &name, total, &on_progress).await?;
            Ok(JsValue::from_str(&name))
        })
    }

    /// Loads a file the visitor picked, through the same streaming path
    /// (`File.stream()`), so it is not read into memory first either.
    #[wasm_bindgen(js_name = loadFile)]
    pub fn load_file(&self, file: web_sys::File, on_progress: Function) -> Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let _busy = claim(&state)?;
            let total = file.size() as usize;
            let name = file.name();
            load_stream(&state, file.stream(), &name, total, &on_progress).await?;
            Ok(JsValue::from_str(&name))
        })
    }

    /// Runs a request (JSON, `session::Request`): a batch of prompts
    /// generated together. `on_text(seq, text)` gets each sequence's new
    /// text, `on_step(json)` a `session::StepReport` per forward pass.
    /// Resolves to a `session::Report` as JSON.
    pub fn generate(&self, request: String, on_text: Function, on_step: Function) -> Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let _busy = claim(&state)?;
            let req: Request = serde_json::from_str(&request).map_err(|e| js_err(format!("bad request: {e}")))?;
            let loaded = state
                .loaded
                .borrow()
                .clone()
                .ok_or_else(|| js_err("no model is loaded yet"))?;
            let report = session::generate(
                &loaded,
                &req,
                |ev| match ev {
                    Event::Text { seq, text } => {
                        let _ = on_text.call2(&JsValue::NULL, &JsValue::from(seq as u32), &JsValue::from_str(text));
                    }
                    Event::Step(r) => {
                        let json = serde_json::to_string(r).unwrap_or_default();
                        let _ = on_step.call1(&JsValue::NULL, &JsValue::from_str(&json));
                    }
                },
                // The next task of the event loop, so the page repaints between steps.
                || sleep_ms(0),
            )
            .await
            .map_err(js_err)?;
            Ok(JsValue::from_str(&serde_json::to_string(&report).map_err(js_err)?))
        })
    }
}

/// Loads `stream` into the light page's state, reporting progress to JS.
async fn load_stream(
    state: &Rc<State>,
    stream: web_sys::ReadableStream,
    name: &str,
    total: usize,
    on_progress: &Function,
) -> Result<(), JsValue> {
    // Drop the old model first, so its GPU buffers are freed before the new
    // ones are made.
    state.loaded.replace(None);
    let loaded = read_model(&state.backend, stream, name, total, |received, total| {
        let _ = on_progress.call2(
            &JsValue::NULL,
            &JsValue::from(received as f64),
            &JsValue::from(total as f64),
        );
    })
    .await
    .map_err(js_err)?;
    state.loaded.replace(Some(Rc::new(loaded)));
    Ok(())
}

/// Whether the browser offers WebGPU at all (`navigator.gpu`).
pub(crate) fn has_webgpu() -> bool {
    let Some(window) = web_sys::window() else { return false };
    let gpu = Reflect::get(&window.navigator(), &JsValue::from_str("gpu")).unwrap_or(JsValue::UNDEFINED);
    !gpu.is_undefined() && !gpu.is_null()
}

/// Fetches `url` and returns its body as a stream, with its length from
/// `Content-Length` (the loader needs the file size up front).
pub(crate) async fn fetch_stream(url: &str) -> Result<(web_sys::ReadableStream, usize), String> {
    let resp = fetch(url).await?;
    let total = resp
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| {
            format!(
                "{url}: the server sent no Content-Length; the loader needs the file size (serve it with `lynx web`)"
            )
        })?;
    let body = resp.body().ok_or_else(|| format!("{url}: the response has no body"))?;
    Ok((body, total))
}

/// Fetches `url` as UTF-8 text of at most `max_bytes`.
pub(crate) async fn fetch_text(url: &str, max_bytes: usize) -> Result<String, String> {
    let resp = fetch(url).await?;
    let buf = JsFuture::from(
        resp.array_buffer()
            .map_err(|e| format!("reading {url} failed: {}", describe(&e)))?,
    )
    .await
    .map_err(|e| format!("reading {url} failed: {}", describe(&e)))?;
    let bytes = Uint8Array::new(&buf);
    if bytes.length() as usize > max_bytes {
        return Err(format!(
            "{url} is {} KiB; the QA mode reads documents of up to {} KiB",
            bytes.length() / 1024,
            max_bytes / 1024
        ));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{url} is not UTF-8 text"))
}

async fn fetch(url: &str) -> Result<web_sys::Response, String> {
    let window = web_sys::window().ok_or("no window")?;
    let resp: web_sys::Response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| format!("fetching {url} failed: {}", describe(&e)))?
        .dyn_into()
        .map_err(|_| format!("fetching {url}: not a response"))?;
    if !resp.ok() {
        return Err(format!("fetching {url}: HTTP {} {}", resp.status(), resp.status_text()));
    }
    Ok(resp)
}

/// Reads `stream` chunk by chunk into the model loader, calling
/// `progress(received, total)` per chunk; only the chunk in hand is copied
/// into wasm memory (on WebGPU).
pub(crate) async fn read_model(
    backend: &Backend,
    stream: web_sys::ReadableStream,
    name: &str,
    total: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Loaded, String> {
    let mut load = ModelLoad::new(backend, name, total);
    let reader: web_sys::ReadableStreamDefaultReader = stream
        .get_reader()
        .dyn_into()
        .map_err(|_| format!("reading {name}: no stream reader"))?;
    let mut chunk = Vec::new();
    let mut received = 0usize;
    loop {
        let r = JsFuture::from(reader.read())
            .await
            .map_err(|e| format!("reading {name} failed: {}", describe(&e)))?;
        let done = Reflect::get(&r, &JsValue::from_str("done"))
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            break;
        }
        let value: Uint8Array = Reflect::get(&r, &JsValue::from_str("value"))
            .ok()
            .and_then(|v| v.dyn_into().ok())
            .ok_or_else(|| format!("reading {name}: a chunk is not bytes"))?;
        chunk.resize(value.length() as usize, 0);
        value.copy_to(&mut chunk);
        load.push(&chunk).map_err(|e| e.to_string())?;
        received += chunk.len();
        progress(received, total);
    }
    load.finish(total).map_err(|e| e.to_string())
}

/// A future that resolves after `ms` milliseconds (a timeout; 0 is the next
/// task of the event loop), so the page can repaint in between.
pub(crate) async fn sleep_ms(ms: i32) {
    let promise = Promise::new(&mut |resolve, _| {
        let scheduled = web_sys::window().is_some_and(|w| {
            w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms)
                .is_ok()
        });
        if !scheduled {
            let _ = resolve.call0(&JsValue::NULL);
        }
    });
    let _ = JsFuture::from(promise).await;
}

pub(crate) fn describe(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}
