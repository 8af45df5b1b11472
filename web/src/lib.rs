//! `lynx-web`: the Lynx runtime in the browser. Built for
//! `wasm32-unknown-unknown` with wgpu's WebGPU backend (`web/build.sh`); on
//! native targets the crate is empty.
//!
//! - [`session`]: the UI-independent demo driver (backend choice, streamed
//!   model loading, step-by-step batched generation with expert metrics).
//! - this file: the JavaScript surface ([`Demo`]) that `app.js` calls, and
//!   the glue between JS streams and promises and the session.
//!
//! A UI calls `Demo.create()`, then `loadUrl` or `loadFile`, then
//! `generate`; every long call returns a promise and reports progress
//! through a callback, so the page stays responsive.

#![cfg(target_arch = "wasm32")]

pub mod session;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use js_sys::{Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};

use crate::session::{Backend, Event, Loaded, ModelLoad, Request};

/// Panics become console errors with their message, instead of an opaque
/// "unreachable" trap.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            web_sys::console::error_1(&format!("lynx-web panicked: {info}").into());
        }));
    });
}

fn js_err(e: impl std::fmt::Display) -> JsValue {
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
        let window = web_sys::window().ok_or_else(|| js_err("no window"))?;
        let gpu = Reflect::get(&window.navigator(), &JsValue::from_str("gpu")).unwrap_or(JsValue::UNDEFINED);
        let has_webgpu = !gpu.is_undefined() && !gpu.is_null();
        let backend = Backend::open(force_cpu, has_webgpu).await;
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
            let window = web_sys::window().ok_or_else(|| js_err("no window"))?;
            let resp: web_sys::Response = JsFuture::from(window.fetch_with_str(&url))
                .await
                .map_err(|e| js_err(format!("fetching {url} failed: {}", describe(&e))))?
                .dyn_into()?;
            if !resp.ok() {
                return Err(js_err(format!(
                    "fetching {url}: HTTP {} {}",
                    resp.status(),
                    resp.status_text()
                )));
            }
            let total = resp
                .headers()
                .get("content-length")?
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| {
                    js_err(format!(
                        "{url}: the server sent no Content-Length; the loader needs the file size (serve it with `lynx web`)"
                    ))
                })?;
            let body = resp
                .body()
                .ok_or_else(|| js_err(format!("{url}: the response has no body")))?;
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
                next_task,
            )
            .await
            .map_err(js_err)?;
            Ok(JsValue::from_str(&serde_json::to_string(&report).map_err(js_err)?))
        })
    }
}

/// Reads `stream` chunk by chunk into the model loader; only the chunk in
/// hand is copied into wasm memory (on WebGPU).
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
    let mut load = ModelLoad::new(&state.backend, name, total);
    let reader: web_sys::ReadableStreamDefaultReader = stream.get_reader().dyn_into()?;
    let mut chunk = Vec::new();
    let mut received = 0usize;
    loop {
        let r = JsFuture::from(reader.read())
            .await
            .map_err(|e| js_err(format!("reading {name} failed: {}", describe(&e))))?;
        if Reflect::get(&r, &JsValue::from_str("done"))?.as_bool().unwrap_or(true) {
            break;
        }
        let value: Uint8Array = Reflect::get(&r, &JsValue::from_str("value"))?.dyn_into()?;
        chunk.resize(value.length() as usize, 0);
        value.copy_to(&mut chunk);
        load.push(&chunk).map_err(js_err)?;
        received += chunk.len();
        let _ = on_progress.call2(
            &JsValue::NULL,
            &JsValue::from(received as f64),
            &JsValue::from(total as f64),
        );
    }
    let loaded = load.finish(total).map_err(js_err)?;
    state.loaded.replace(Some(Rc::new(loaded)));
    Ok(())
}

/// A future that resolves in a later task of the event loop (a zero
/// timeout), so the page can repaint between generation steps.
async fn next_task() {
    let promise = Promise::new(&mut |resolve, _| {
        let scheduled = web_sys::window().is_some_and(|w| {
            w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0)
                .is_ok()
        });
        if !scheduled {
            let _ = resolve.call0(&JsValue::NULL);
        }
    });
    let _ = JsFuture::from(promise).await;
}

fn describe(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}
