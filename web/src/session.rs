//! The demo session: what the page does, without the page. It picks the
//! backend (WebGPU, or the CPU reference when the browser has none), loads
//! the model from a byte stream, and runs batched generations step by step,
//! reporting text and per-step expert metrics as they come. It has no
//! threads and never blocks, so any UI on the browser's event loop can drive
//! it: the HTML page in `index.html` today, the viewer's egui app later.
//!
//! All model code is the runtime's: `GgufStreamLoad` and `GpuModel` on
//! WebGPU, `Model` on the CPU, and `BatchGeneration` for the generation loop
//! on both.

use std::path::PathBuf;
use std::sync::Arc;

use lynx::generate::{BatchGeneration, GenerateOptions, Generation};
use lynx::gguf::GgufFile;
use lynx::gpu::{GgufStreamLoad, GpuContext, GpuModel, GpuOptions};
use lynx::metrics::StepMetrics;
use lynx::tensor::Buffer;
use lynx::{ChatMessage, Model, Tokenizer};
use serde::Serialize;
use web_time::Instant;

/// Where the model runs.
pub enum Backend {
    Gpu(Arc<GpuContext>),
    /// The CPU reference in wasm: no WebGPU here, or it failed to open.
    Cpu {
        why: String,
    },
}

/// What the page shows about the backend.
#[derive(Clone, Debug, Serialize)]
pub struct BackendInfo {
    /// `webgpu` or `cpu`.
    pub kind: &'static str,
    /// The WebGPU adapter as wgpu reports it (empty on the CPU).
    pub adapter_name: String,
    pub adapter_backend: String,
    pub device_type: String,
    pub driver: String,
    /// The features and limits in use, or why the CPU is used.
    pub message: String,
}

impl Backend {
    /// Opens WebGPU unless `force_cpu`; falls back to the CPU, saying why,
    /// when the browser has no WebGPU or hands out no usable device.
    pub async fn open(force_cpu: bool, has_webgpu: bool) -> Backend {
        if force_cpu {
            return Backend::Cpu {
                why: "The CPU was asked for (?cpu in the address): running the CPU reference in wasm.".into(),
            };
        }
        if !has_webgpu {
            return Backend::Cpu {
                why: "WebGPU is not available in this browser (navigator.gpu is missing): running the CPU \
                      reference in wasm instead, slowly for larger models. Chrome and Edge have WebGPU; \
                      Chromium on Linux needs --enable-unsafe-webgpu."
                    .into(),
            };
        }
        // Errors go through the uncaptured-error list on the web (error
        // scopes are answered on the event loop), so per-call scopes would
        // only add promises; pipeline creation is still checked.
        let opts = GpuOptions {
            adapter_name: None,
            check_errors: false,
        };
        match GpuContext::new_async(opts).await {
            // wgpu's browser types are neither Send nor Sync, but the runtime
            // shares a context as an Arc (native code does use threads); the
            // page has one thread, so here the Arc is just a reference count.
            #[allow(clippy::arc_with_non_send_sync)]
            Ok(ctx) => Backend::Gpu(Arc::new(ctx)),
            Err(e) => Backend::Cpu {
                why: format!(
                    "WebGPU is present but could not be used ({e}): running the CPU reference in wasm, slowly"
                ),
            },
        }
    }

    pub fn info(&self) -> BackendInfo {
        match self {
            Backend::Gpu(ctx) => {
                let i = ctx.adapter_info();
                BackendInfo {
                    kind: "webgpu",
                    adapter_name: i.name.clone(),
                    adapter_backend: format!("{:?}", i.backend),
                    device_type: format!("{:?}", i.device_type),
                    driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
                    message: ctx.capabilities(),
                }
            }
            Backend::Cpu { why } => BackendInfo {
                kind: "cpu",
                adapter_name: String::new(),
                adapter_backend: String::new(),
                device_type: String::new(),
                driver: String::new(),
                message: why.clone(),
            },
        }
    }
}

/// The model, on whichever backend (one per page, so the variants' sizes
/// do not matter).
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Gpu(GpuModel),
    Cpu(Model),
}

/// A loaded model and its tokenizer.
pub struct Loaded {
    pub engine: Engine,
    pub tokenizer: Tokenizer,
    pub name: String,
    /// Bytes of the file.
    pub bytes: usize,
}

/// What the page shows about the model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub bytes: usize,
    pub arch: String,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub engine: &'static str,
}

impl Loaded {
    pub fn info(&self) -> ModelInfo {
        let cfg = match &self.engine {
            Engine::Gpu(g) => &g.config,
            Engine::Cpu(m) => &m.config,
        };
        ModelInfo {
            name: self.name.clone(),
            bytes: self.bytes,
            arch: format!("{:?}", cfg.arch),
            layers: cfg.num_layers,
            experts: cfg.moe.as_ref().map_or(0, |m| m.num_experts),
            top_k: cfg.moe.as_ref().map_or(0, |m| m.top_k),
            engine: match self.engine {
                Engine::Gpu(_) => "gpu",
                Engine::Cpu(_) => "cpu",
            },
        }
    }
}

/// Receives a model file chunk by chunk. On WebGPU each chunk goes straight
/// to the GPU buffers; on the CPU the file is collected in memory (the CPU
/// reference computes from it), which the page says.
#[allow(clippy::large_enum_variant)]
pub enum ModelLoad {
    Gpu { load: GgufStreamLoad, name: String },
    Cpu { name: String, bytes: Vec<u8> },
}

impl ModelLoad {
    pub fn new(backend: &Backend, name: &str, total: usize) -> ModelLoad {
        match backend {
            Backend::Gpu(ctx) => ModelLoad::Gpu {
                load: GgufStreamLoad::new(ctx.clone(), name, total),
                name: name.to_string(),
            },
            Backend::Cpu { .. } => ModelLoad::Cpu {
                name: name.to_string(),
                bytes: Vec::with_capacity(total),
            },
        }
    }

    pub fn push(&mut self, chunk: &[u8]) -> lynx::Result<()> {
        match self {
            ModelLoad::Gpu { load, .. } => load.push(chunk),
            ModelLoad::Cpu { bytes, .. } => {
                bytes.extend_from_slice(chunk);
                Ok(())
            }
        }
    }

    pub fn finish(self, total: usize) -> lynx::Result<Loaded> {
        let missing = |name: &str| lynx::Error::Tokenizer {
            path: PathBuf::from(name),
            reason: "the model has no tokenizer in its metadata; the demo needs one".into(),
        };
        match self {
            ModelLoad::Gpu { load, name } => {
                let (gpu, tok) = load.finish()?;
                let tokenizer = tok.ok_or_else(|| missing(&name))?;
                Ok(Loaded {
                    engine: Engine::Gpu(gpu),
                    tokenizer,
                    name,
                    bytes: total,
                })
            }
            ModelLoad::Cpu { name, bytes } => {
                let len = bytes.len();
                let path = PathBuf::from(&name);
                let file = GgufFile::from_buffer(path.clone(), Arc::new(Buffer::Owned(bytes)))?;
                let lm = lynx::loader::from_gguf(&file, &path)?;
                let tokenizer = lm.tokenizer.ok_or_else(|| missing(&name))?;
                Ok(Loaded {
                    engine: Engine::Cpu(lm.model),
                    tokenizer,
                    name,
                    bytes: len,
                })
            }
        }
    }
}

/// One generation request from the page.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Request {
    pub prompts: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[serde(default = "yes")]
    pub chat: bool,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub seed: u64,
}

fn yes() -> bool {
    true
}

fn default_max_new_tokens() -> usize {
    32
}

/// What one forward pass did, for the live readout.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: usize,
    /// `prefill` or `decode`.
    pub phase: &'static str,
    /// Sequences in the step.
    pub sequences: usize,
    pub ms: f64,
    /// The GPU engine's expert metrics of the step (none on the CPU).
    pub metrics: Option<StepMetrics>,
}

/// The outcome of a request.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub texts: Vec<String>,
    pub tokens: Vec<Vec<u32>>,
    pub finish: Vec<&'static str>,
    pub prompt_tokens: Vec<usize>,
    pub engine: &'static str,
    pub prefill_ms: f64,
    /// Tokens sampled from decode steps (the first token of each sequence
    /// comes from the prefill and is not counted).
    pub decode_tokens: usize,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
    pub steps: usize,
}

/// Something for the page while a request runs.
pub enum Event<'a> {
    Text { seq: usize, text: &'a str },
    Step(&'a StepReport),
}

/// Runs `req` on `loaded`, step by step, calling `on_event` with new text
/// and a report per step, and awaiting `pause` between steps so the page
/// can repaint.
pub async fn generate<P: std::future::Future<Output = ()>>(
    loaded: &Loaded,
    req: &Request,
    mut on_event: impl FnMut(Event<'_>),
    mut pause: impl FnMut() -> P,
) -> lynx::Result<Report> {
    let tok = &loaded.tokenizer;
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for p in &req.prompts {
        prompts.push(if req.chat {
            tok.encode_chat(&[ChatMessage::user(p.as_str())])?
        } else {
            tok.encode(p, true)?
        });
    }
    let opts = GenerateOptions {
        max_new_tokens: req.max_new_tokens,
        sampling: lynx::sampling::SamplingParams {
            temperature: req.temperature,
            seed: req.seed,
            ..Default::default()
        },
        ..GenerateOptions::default()
    };
    match &loaded.engine {
        Engine::Gpu(g) => run(g, tok, &prompts, &opts, &mut on_event, &mut pause, "gpu").await,
        Engine::Cpu(m) => run(m, tok, &prompts, &opts, &mut on_event, &mut pause, "cpu").await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run<E: lynx::generate::Engine, P: std::future::Future<Output = ()>>(
    engine: &E,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_event: &mut impl FnMut(Event<'_>),
    pause: &mut impl FnMut() -> P,
    name: &'static str,
) -> lynx::Result<Report> {
    let mut g = BatchGeneration::new(engine.config(), tok, prompts, opts, || engine.new_sequence())?;
    let (mut prefill_ms, mut decode_ms, mut decode_tokens, mut steps) = (0.0, 0.0, 0, 0);
    loop {
        let started = Instant::now();
        let (out, sequences) = {
            let Some((spec, mut batch)) = g.next_batch() else { break };
            let n = batch.len();
            // The GPU engine returns the step's expert metrics with it.
            (engine.run(&mut batch, spec.with_metrics()).await?, n)
        };
        let metrics = out.metrics.last().map(|m| (**m).clone());
        g.accept(out.logits, |seq, text| on_event(Event::Text { seq, text }))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let phase = if steps == 0 { "prefill" } else { "decode" };
        if steps == 0 {
            prefill_ms = ms;
        } else {
            decode_ms += ms;
            decode_tokens += sequences;
        }
        let report = StepReport {
            step: steps,
            phase,
            sequences,
            ms,
            metrics,
        };
        on_event(Event::Step(&report));
        steps += 1;
        pause().await;
    }
    let gens: Vec<Generation> = g.finish();
    Ok(Report {
        texts: gens.iter().map(|g| g.text.clone()).collect(),
        tokens: gens.iter().map(|g| g.tokens.clone()).collect(),
        finish: gens.iter().map(|g| g.finish.as_str()).collect(),
        prompt_tokens: gens.iter().map(|g| g.prompt_tokens).collect(),
        engine: name,
        prefill_ms,
        decode_tokens,
        decode_ms,
        decode_tokens_per_s: if decode_ms > 0.0 {
            decode_tokens as f64 / (decode_ms / 1e3)
        } else {
            0.0
        },
        steps,
    })
}
