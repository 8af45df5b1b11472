//! The `lynx` command line: inspect a checkpoint, generate a completion,
//! chat interactively, quantize, or benchmark; on the GPU engine by default
//! (falling back to the CPU reference, with a notice, where no GPU adapter
//! opens), or on the CPU reference with `--device cpu`.

use std::collections::BTreeMap;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[path = "lynx/eval_cmd.rs"]
mod eval_cmd;
#[path = "lynx/web_cmd.rs"]
mod web_cmd;

use lynx::config::ModelConfig;
use lynx::generate::{GenerateOptions, Generation, generate};
use lynx::gpu::{GpuContext, GpuModel, GpuOptions};
use lynx::loader::{LoadedModel, ModelFormat, TensorInfo};
use lynx::metrics::TraceWriter;
use lynx::sampling::SamplingParams;
use lynx::selection::ExpertPolicy;
use lynx::{ChatMessage, Tokenizer};

// In a folder of its own, so that cargo does not take it for a binary.
#[path = "lynx/serve_cmd.rs"]
mod serve_cmd;

#[derive(Parser)]
#[command(name = "lynx", version, about = "Lynx: portable MoE inference runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's configuration, parameter counts and tensor dtypes.
    Inspect {
        /// A Hugging Face checkpoint directory or a .gguf file.
        model: PathBuf,
    },
    /// Generate a completion for one prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Chat interactively: one user message per line on stdin; `/reset`
    /// clears the conversation, `/quit` or end of input exits.
    Chat(ChatArgs),
    /// Measure prefill and decode throughput on the GPU for several batch
    /// sizes and expert-selection policies in one run, with the distinct
    /// experts and model bytes each decode step reads, the bandwidth that
    /// achieves, and the selection kernels' own cost.
    Bench(BenchArgs),
    /// Measure what each expert-selection policy costs in accuracy against
    /// exact routing: held-out perplexity, top-1 agreement, KL, and
    /// question-answering exact match.
    Eval(eval_cmd::EvalArgs),
    /// Serve the browser demo (built by `web/build.sh`) on 127.0.0.1.
    Web(web_cmd::WebArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text
    /// completions, streamed or not, with continuous batching), or with
    /// `--bench` measure that server under load.
    Serve(serve_cmd::ServeArgs),
    /// Write a model as a GGUF file in llama.cpp's layout for its
    /// architecture, with its matrices quantised, so the next load is fast
    /// and small.
    Quantize {
        /// A Hugging Face checkpoint directory or a .gguf file.
        model: PathBuf,
        /// Output .gguf file.
        #[arg(short, long)]
        output: PathBuf,
        /// Storage format of the weight matrices (norms, biases and routers
        /// stay f32): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
        /// q3_k, q4_k, q5_k or q6_k. Rows that are not whole blocks fall
        /// back as llama.cpp's do (q4_k to q5_0, q6_k to q8_0, ...).
        #[arg(long, value_parser = parse_export_dtype, default_value = "q8_0")]
        to: lynx::DType,
        /// Storage format of the token embedding and LM head, which every
        /// token reads (e.g. q8_0 or q6_k beside `--to q4_k`) [default: as
        /// --to].
        #[arg(long, value_parser = parse_export_dtype)]
        embedding: Option<lynx::DType>,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// A Hugging Face checkpoint directory or a .gguf file [default: the
    /// default model].
    model: Option<PathBuf>,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32,64")]
    batch: Vec<usize>,
    /// Expert-selection policies to measure, comma-separated (exact, lynx,
    /// lynx:alpha=A,beta=B,threshold=T, oea, oea=K0, topk=N), each on the
    /// same prefilled prompts [default for MoE models: exact,lynx,oea,topk=K/2].
    #[arg(long, value_name = "LIST")]
    experts: Option<String>,
    /// Prompt tokens per sequence (real text) for the prefill measurement.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Re-store the weights in this format after loading.
    #[arg(long, value_enum)]
    quant: Option<QuantFormat>,
    /// Also time a 4096x4096 GEMV per quant format on the GPU and on the CPU.
    #[arg(long)]
    kernels: bool,
    /// Write every step's expert-selection metrics as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
#[allow(non_camel_case_types)]
enum QuantFormat {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    F32,
}

impl From<QuantFormat> for lynx::DType {
    fn from(q: QuantFormat) -> Self {
        match q {
            QuantFormat::Q8_0 => lynx::DType::Q8_0,
            QuantFormat::Q4_0 => lynx::DType::Q4_0,
            QuantFormat::Q4_1 => lynx::DType::Q4_1,
            QuantFormat::F32 => lynx::DType::F32,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a single user message.
    #[arg(long)]
    chat: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    run: RunArgs,
    /// An optional system message that starts every conversation.
    #[arg(long)]
    system: Option<String>,
}

/// Options shared by the commands that run the model.
#[derive(Args)]
struct RunArgs {
    /// A Hugging Face checkpoint directory or a .gguf file [default: the
    /// default model].
    model: Option<PathBuf>,
    /// Where to run the model: auto (the GPU engine, or the CPU engine with a
    /// notice when this machine has no GPU adapter), gpu (fail without one)
    /// or cpu (the plain-Rust reference).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Re-store the weight matrices in this format after loading (e.g. to
    /// run an f32/f16 safetensors checkpoint as Q8_0 or Q4_0) [default:
    /// keep the stored format].
    #[arg(long, value_enum)]
    quant: Option<QuantFormat>,
    /// The most tokens to generate [default: 128 for generate, 512 per reply
    /// for chat].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only from the K most likely tokens; 0 turns this off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: sample from the most likely tokens whose
    /// probabilities sum to P; 1 turns this off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this string (repeatable); the string
    /// itself is not printed.
    #[arg(long, value_name = "STR")]
    stop: Vec<String>,
    /// Expert selection for the decode steps of an MoE model on the GPU:
    /// exact, lynx, lynx:alpha=A,beta=B,threshold=T, oea, oea=K0 or topk=N.
    /// A single generation decodes a batch of one, where lynx and oea
    /// route exactly; `lynx bench` and `lynx serve` batch several.
    #[arg(long, value_name = "POLICY", default_value = "exact")]
    experts: ExpertPolicy,
    /// Write every step's expert-selection metrics (GPU) as JSON lines to
    /// FILE.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

/// Compute devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    /// The GPU engine when an adapter opens, else the CPU engine (with a
    /// one-line notice on stderr).
    Auto,
    /// The wgpu engine (Vulkan, Metal, DX12; lavapipe on machines without a GPU).
    Gpu,
    /// The plain-Rust f32 reference forward pass.
    Cpu,
}

/// A loaded model and the engine that runs it.
struct Loaded {
    lm: LoadedModel,
    gpu: Option<GpuModel>,
    trace: Option<TraceWriter>,
}

impl Loaded {
    /// Closes the `--trace` file, if any, and says how much it holds.
    fn finish_trace(self) -> anyhow::Result<()> {
        finish_trace(self.trace, self.gpu)
    }
}

/// Starts writing `gpu`'s step metrics to `path`.
fn start_trace(gpu: &GpuModel, path: &Path) -> anyhow::Result<TraceWriter> {
    TraceWriter::start(gpu.subscribe(), path).context("cannot write the --trace file")
}

/// Drops the engine (so no step can follow) and then closes the trace.
fn finish_trace(trace: Option<TraceWriter>, gpu: Option<GpuModel>) -> anyhow::Result<()> {
    drop(gpu);
    if let Some(t) = trace {
        let path = t.path().to_path_buf();
        let steps = t.finish().context("failed to write the --trace file")?;
        eprintln!("[trace: {steps} steps written to {}]", path.display());
    }
    Ok(())
}

impl RunArgs {
    /// Builds the generation options, validating the sampling flags before
    /// the (slow) model load so that a typo fails fast.
    fn options(&self, default_max_tokens: usize) -> anyhow::Result<GenerateOptions> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        sampling.validate().context("invalid sampling flags")?;
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(anyhow!("--stop needs a non-empty string"));
        }
        Ok(GenerateOptions {
            max_new_tokens: self.max_tokens.unwrap_or(default_max_tokens),
            sampling,
            stop: self.stop.clone(),
            stop_on_eos: true,
            policy: self.experts,
        })
    }

    fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => lynx::loader::default_model_path().context("no MODEL given, and no default model could be found"),
        }
    }

    /// Loads the model, re-stores its weights if asked, and uploads them to
    /// the GPU when that is the device.
    fn load(&self) -> anyhow::Result<Loaded> {
        if self.device == Device::Cpu && (!self.experts.is_exact() || self.trace.is_some()) {
            return Err(anyhow!(
                "--experts and --trace need the GPU engine (drop --device cpu): the CPU reference has no selection kernels to speed up and no step metrics to trace"
            ));
        }
        // Expert selection rewrites the GPU's routing buffer and --trace
        // records its metrics: neither exists on the CPU engine, so with them
        // a missing adapter is an error rather than a silent exact run.
        let needs_gpu = if !self.experts.is_exact() {
            Some(format!("--experts {}", self.experts))
        } else {
            self.trace.as_ref().map(|_| "--trace".to_string())
        };
        let ctx = open_gpu(self.device, needs_gpu.as_deref())?;
        let mut lm = load_model(&self.model_path()?)?;
        if let Some(q) = self.quant {
            lm.model
                .requantize(q.into())
                .context("failed to re-store the weights")?;
        }
        let gpu = match ctx {
            None => None,
            Some(ctx) => Some(upload_to_gpu(&lm, ctx)?),
        };
        if let Some(gpu) = &gpu {
            self.experts.resolve_for(&gpu.config).context("invalid --experts")?;
        }
        let trace = match (&gpu, &self.trace) {
            (Some(gpu), Some(path)) => Some(start_trace(gpu, path)?),
            _ => None,
        };
        Ok(Loaded { lm, gpu, trace })
    }
}

/// The notice printed when `--device auto` finds no GPU adapter.
const CPU_FALLBACK_NOTICE: &str = "running on the CPU engine (slower)";

/// Opens the GPU for `device`: `None` means the CPU engine. With `auto`, a
/// machine without a usable adapter falls back to the CPU engine with a
/// one-line notice, unless `needs_gpu` names a feature only the GPU engine
/// has, in which case the missing adapter is an error that says so.
fn open_gpu(device: Device, needs_gpu: Option<&str>) -> anyhow::Result<Option<GpuContext>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Gpu => GpuContext::new(GpuOptions::from_env())
            .map(Some)
            .context("could not open a GPU (--device gpu); run with `--device cpu` to use the CPU reference instead"),
        Device::Auto => match GpuContext::new(GpuOptions::from_env()) {
            Ok(ctx) => Ok(Some(ctx)),
            Err(e) => match needs_gpu {
                Some(what) => Err(anyhow!(
                    "{what} needs the GPU engine (its selection kernels and step metrics exist only there), and \
                     no GPU adapter was found ({e})"
                )),
                None => {
                    eprintln!("lynx: no GPU adapter found ({e}); {CPU_FALLBACK_NOTICE}");
                    Ok(None)
                }
            },
        },
    }
}

/// Opens the GPU for a command that only the GPU engine can run (`bench`,
/// `eval`: they measure expert-selection policies), whatever `--device`
/// says, naming the command when no adapter opens.
fn open_gpu_for(command: &str) -> anyhow::Result<GpuContext> {
    GpuContext::new(GpuOptions::from_env()).with_context(|| {
        format!(
            "`lynx {command}` measures expert-selection policies, which run on the GPU engine only, and no GPU \
             adapter could be opened; it has no CPU fallback"
        )
    })
}

/// Uploads the model's weights to the GPU opened as `ctx` (reporting the
/// adapter on stderr), with a progress bar when a person is watching.
fn upload_to_gpu(lm: &LoadedModel, ctx: GpuContext) -> anyhow::Result<GpuModel> {
    eprintln!("[gpu: {}]", ctx.adapter_report());
    let layers = lm.model.layers.len() as u64;
    let bar = io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(layers);
        if let Ok(style) = ProgressStyle::with_template("uploading weights {bar:30} {pos}/{len} layers ({elapsed})") {
            pb.set_style(style);
        }
        pb
    });
    let gpu = GpuModel::upload(std::sync::Arc::new(ctx), &lm.model, |done, _| {
        if let Some(pb) = &bar {
            pb.set_position(done as u64);
        }
    })
    .with_context(|| format!("failed to upload {} to the GPU", lm.path.display()))?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(gpu)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { model } => inspect(&model),
        Command::Generate(args) => generate_cmd(&args),
        Command::Chat(args) => chat_cmd(&args),
        Command::Quantize {
            model,
            output,
            to,
            embedding,
        } => quantize_cmd(&model, &output, lynx::export::ExportOptions { dtype: to, embedding }),
        Command::Bench(args) => bench_cmd(&args),
        Command::Eval(args) => eval_cmd::eval_cmd(&args),
        Command::Web(args) => web_cmd::web_cmd(&args),
        Command::Serve(args) => serve_cmd::serve_cmd(&args),
    }
}

/// A `--to`/`--embedding` value: one of the formats the GGUF writer takes,
/// by its lower-case name.
fn parse_export_dtype(s: &str) -> Result<lynx::DType, String> {
    let names = || lynx::export::EXPORT_DTYPES.iter().map(|d| d.name().to_lowercase());
    lynx::export::EXPORT_DTYPES
        .into_iter()
        .find(|d| d.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            format!(
                "unknown format `{s}`; one of {}",
                names().collect::<Vec<_>>().join(", ")
            )
        })
}

fn quantize_cmd(model: &Path, output: &Path, opts: lynx::export::ExportOptions) -> anyhow::Result<()> {
    if output.exists() && output.is_dir() {
        anyhow::bail!("output {} is a directory; give a .gguf file name", output.display());
    }
    let loaded = load_model(model)?;
    let start = Instant::now();
    let bar = io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(loaded.model.layers.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers ({elapsed})") {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(format!("quantising to {}", opts.dtype));
        pb
    });
    let report = lynx::export::write_model_gguf_with(&loaded, opts, output, &mut |done, _| {
        if let Some(pb) = &bar {
            pb.set_position(done as u64);
        }
    })
    .with_context(|| format!("failed to write {}", output.display()))?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    let emb = opts.embedding.map(|e| format!(", embedding {e}")).unwrap_or_default();
    eprintln!(
        "wrote {} ({} architecture, {} tensors, {}{emb}, {:.1} MiB) in {:.1}s",
        output.display(),
        report.arch,
        report.tensors,
        opts.dtype,
        bytes as f64 / (1024.0 * 1024.0),
        start.elapsed().as_secs_f64()
    );
    if !report.fallbacks.is_empty() {
        eprintln!("{} matrices are stored in another format:", report.fallbacks.len());
        for (name, dt, why) in report.fallbacks.iter().take(8) {
            eprintln!("  {name}: {dt} ({why})");
        }
        if report.fallbacks.len() > 8 {
            eprintln!("  ... and {} more", report.fallbacks.len() - 8);
        }
    }
    Ok(())
}

/// Loads a model, with a spinner on stderr when a person is watching it; a
/// spinner written to a log file or pipe would only add noise.
fn load_model(path: &Path) -> anyhow::Result<LoadedModel> {
    let spinner = io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            pb.set_style(style);
        }
        pb.set_message(format!("loading {}", path.display()));
        pb.enable_steady_tick(Duration::from_millis(100));
        pb
    });
    let loaded = lynx::load(path);
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    loaded.with_context(|| format!("failed to load model {}", path.display()))
}

fn require_tokenizer<'a>(loaded: &'a LoadedModel, command: &str) -> anyhow::Result<&'a Tokenizer> {
    loaded.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "model {} has no tokenizer (tokenizer.json or GGUF tokenizer metadata); \
             `lynx {command}` needs one",
            loaded.path.display()
        )
    })
}

// ------------------------------------------------------------------- bench

fn bench_cmd(args: &BenchArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) {
        anyhow::bail!("--batch needs positive batch sizes");
    }
    if args.prompt_tokens == 0 || args.steps == 0 {
        anyhow::bail!("--prompt-tokens and --steps must be at least 1");
    }
    let requested = match &args.experts {
        Some(list) => Some(lynx_cli::eval::parse_policy_list(list).context("invalid --experts")?),
        None => None,
    };
    let path = match &args.model {
        Some(p) => p.clone(),
        None => lynx::loader::default_model_path().context("no MODEL given, and no default model could be found")?,
    };
    let mut lm = load_model(&path)?;
    if let Some(q) = args.quant {
        lm.model
            .requantize(q.into())
            .context("failed to re-store the weights")?;
    }
    let tok = require_tokenizer(&lm, "bench")?;
    let c = &lm.model.config;
    let policies = match (requested, &c.moe) {
        (Some(p), _) => p,
        (None, Some(m)) => eval_cmd::default_policies(m.top_k),
        (None, None) => vec![ExpertPolicy::Exact],
    };
    let mut gpu = upload_to_gpu(&lm, open_gpu_for("bench")?)?;
    for p in &policies {
        // Checks every policy against the model before the long run starts.
        p.resolve_for(&gpu.config)
            .with_context(|| format!("invalid --experts entry `{p}`"))?;
    }
    let trace = args.trace.as_deref().map(|p| start_trace(&gpu, p)).transpose()?;
    println!(
        "model:    {} ({}, {} layers)",
        lm.path.display(),
        c.arch.name(),
        c.num_layers
    );
    if let Some(m) = &c.moe {
        println!("experts:  E={} K={}", m.num_experts, m.top_k);
    }
    println!("adapter:  {}", gpu.ctx.adapter_report());
    println!("weights on GPU: {}", human_bytes(gpu.weight_bytes()));
    println!(
        "prompts:  {} tokens each, a different window of models/eval/heldout.txt per sequence; one prefill per batch \
         size, then {} timed greedy decode steps per policy from the same prefilled state",
        args.prompt_tokens, args.steps
    );
    println!();
    println!(
        "{:>5} {:>14} {:>12} {:>12} {:>9} {:>10} {:>13} {:>13} {:>12} {:>9} {:>10}",
        "batch",
        "policy",
        "prefill t/s",
        "decode t/s",
        "x exact",
        "step ms",
        "experts",
        "expert/step",
        "KV/step",
        "GB/s",
        "select ms"
    );
    for &b in &args.batch {
        let prompts = lynx_cli::bench::bench_prompts(tok, b, args.prompt_tokens)?;
        let batch_rows = lynx_cli::bench::bench_batch(&mut gpu, &prompts, &policies, args.steps)
            .with_context(|| format!("benchmark at batch size {b} failed"))?;
        let exact = batch_rows
            .iter()
            .find(|r| r.policy.is_exact())
            .map(|r| r.decode_tok_s());
        for row in &batch_rows {
            println!(
                "{:>5} {:>14} {:>12.1} {:>12.1} {:>9} {:>10.1} {:>13} {:>13} {:>12} {:>9.2} {:>10.2}",
                b,
                row.policy.to_string(),
                row.prefill_tok_s(),
                row.decode_tok_s(),
                exact.map_or("-".to_string(), |e| format!("{:.2}", row.decode_tok_s() / e)),
                row.decode_step_s() * 1e3,
                match (row.distinct_exact, row.distinct_experts) {
                    (Some(e), Some(s)) => format!("{e:.2} -> {s:.2}"),
                    _ => "-".to_string(),
                },
                human_bytes(row.expert_bytes_per_step as u64),
                human_bytes(row.kv_bytes_per_step as u64),
                row.decode_gb_s(),
                row.selection_s_per_step * 1e3,
            );
        }
    }
    let stats = gpu.stats();
    println!();
    if stats.peak_bytes > 0 {
        println!(
            "peak GPU memory (allocator, sampled per step): {}",
            human_bytes(stats.peak_bytes)
        );
    } else {
        println!("peak GPU memory: not reported by this backend");
    }
    println!("x exact = decode tokens/s over exact routing's at the same batch size;");
    println!("experts = mean distinct experts per MoE layer per decode step, exact routing -> after selection;");
    println!(
        "expert/step = expert weight bytes read per decode step (all layers); GB/s = (all weights + KV)/step time;"
    );
    println!("select ms = GPU time per decode step of the selection kernels alone (all layers), measured separately.");

    if args.kernels {
        println!();
        println!("GEMV 4096x4096, T=1 (weight bytes read per second):");
        for dtype in lynx::DType::ALL.into_iter().filter(|d| d.is_quantized()) {
            let (gs, gbw) = lynx::gpu::bench_matmul(&gpu.ctx, dtype, 4096, 4096, 1, 20)?;
            let (cs, cbw) = lynx::gpu::bench_cpu_matmul(dtype, 4096, 4096, 1, 20);
            println!(
                "  {dtype:<5} GPU {:>7.3} ms {:>6.2} GB/s   CPU ({} threads) {:>7.3} ms {:>6.2} GB/s",
                gs * 1e3,
                gbw,
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                cs * 1e3,
                cbw
            );
        }
    }
    finish_trace(trace, Some(gpu))
}

// ---------------------------------------------------------------- generate

fn generate_cmd(args: &GenerateArgs) -> anyhow::Result<()> {
    let opts = args.run.options(128)?;
    let loaded = args.run.load()?;
    let tok = require_tokenizer(&loaded.lm, "generate")?;

    let ids = if args.chat {
        note_missing_chat_template(&loaded.lm, tok);
        let messages = [ChatMessage::user(args.prompt.as_str())];
        tok.encode_chat(&messages).context("failed to encode the chat prompt")?
    } else {
        tok.encode(&args.prompt, true)
            .context("failed to tokenize the prompt")?
    };

    let (generation, elapsed) = stream_generation(&loaded, tok, &ids, &opts)?;
    print_stats(&generation, elapsed);
    loaded.finish_trace()
}

/// Tells the user when the tokenizer falls back to plain ChatML because the
/// model ships no chat template, since a model trained on another format
/// may then answer poorly.
fn note_missing_chat_template(loaded: &LoadedModel, tok: &Tokenizer) {
    if tok.chat_template().is_none() {
        eprintln!(
            "note: model {} has no chat template; using plain ChatML",
            loaded.path.display()
        );
    }
}

/// Runs one generation, streaming its text to stdout, and returns it with
/// the wall time of the whole call (prefill included).
fn stream_generation(
    loaded: &Loaded,
    tok: &Tokenizer,
    ids: &[u32],
    opts: &GenerateOptions,
) -> anyhow::Result<(Generation, Duration)> {
    let mut out = StdoutStream::new();
    let start = Instant::now();
    let generation = match &loaded.gpu {
        Some(gpu) => generate(gpu, tok, ids, opts, |text| out.write(text)),
        None => generate(&loaded.lm.model, tok, ids, opts, |text| out.write(text)),
    }
    .context("generation failed")?;
    let elapsed = start.elapsed();
    out.finish()?;
    Ok((generation, elapsed))
}

/// Prints the one-line summary of a generation to stderr, so that stdout
/// holds only the generated text. The rate covers the whole call, prompt
/// processing included, because that is the latency a user experiences.
fn print_stats(g: &Generation, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { g.tokens.len() as f64 / secs } else { 0.0 };
    eprintln!(
        "[{} prompt tokens, {} generated, {:.1} tok/s, finish: {}]",
        g.prompt_tokens,
        g.tokens.len(),
        rate,
        g.finish
    );
}

/// Writes streamed text to stdout, flushing every piece so that it appears
/// as it is generated. The streaming callback cannot fail, so the first
/// write error is kept, later writes are skipped, and `finish` reports it.
struct StdoutStream {
    out: io::StdoutLock<'static>,
    error: Option<io::Error>,
    wrote: bool,
    ends_with_newline: bool,
}

impl StdoutStream {
    fn new() -> Self {
        StdoutStream {
            out: io::stdout().lock(),
            error: None,
            wrote: false,
            ends_with_newline: false,
        }
    }

    fn write(&mut self, text: &str) {
        if self.error.is_some() || text.is_empty() {
            return;
        }
        let result = self.out.write_all(text.as_bytes()).and_then(|()| self.out.flush());
        match result {
            Ok(()) => {
                self.wrote = true;
                self.ends_with_newline = text.ends_with('\n');
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// Ends the output with a newline (so that the shell prompt or the next
    /// chat turn starts on its own line) and reports any write error.
    fn finish(mut self) -> anyhow::Result<()> {
        if self.wrote && !self.ends_with_newline {
            self.write("\n");
        }
        match self.error {
            Some(e) => Err(e).context("failed to write to stdout"),
            None => Ok(()),
        }
    }
}

// -------------------------------------------------------------------- chat

fn chat_cmd(args: &ChatArgs) -> anyhow::Result<()> {
    let opts = args.run.options(512)?;
    let loaded = args.run.load()?;
    let tok = require_tokenizer(&loaded.lm, "chat")?;
    note_missing_chat_template(&loaded.lm, tok);

    let fresh = || -> Vec<ChatMessage> { args.system.iter().map(|s| ChatMessage::system(s.as_str())).collect() };
    let mut messages = fresh();
    let stdin = io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!(
            "chatting with {}; /reset clears the conversation, /quit or Ctrl-D exits",
            loaded.lm.path.display()
        );
    }

    let mut line = String::new();
    loop {
        if interactive {
            print!("> ");
            io::stdout().flush().context("failed to write to stdout")?;
        }
        line.clear();
        let n = stdin.lock().read_line(&mut line).context("failed to read stdin")?;
        if n == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                messages = fresh();
                eprintln!("[conversation cleared]");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(line.trim_end_matches(['\r', '\n'])));

        // Each turn renders and runs the whole conversation from scratch.
        // The engines keep a KV cache per sequence, which `generate`
        // creates per call; re-running the history costs prompt
        // processing each turn but is simple and always matches what the
        // chat template renders (templates may rewrite earlier turns, e.g.
        // dropping reasoning), which reusing a cache would not guarantee.
        let ids = tok.encode_chat(&messages).context("failed to encode the chat prompt")?;
        match stream_generation(&loaded, tok, &ids, &opts) {
            Ok((generation, elapsed)) => {
                print_stats(&generation, elapsed);
                messages.push(ChatMessage::assistant(generation.text));
            }
            Err(e) if is_context_overflow(&e) => {
                // The conversation no longer fits; keep the session alive
                // and let the user decide to reset.
                messages.pop();
                eprintln!("Error: {e:#}\n[the conversation is too long; /reset to start over]");
            }
            Err(e) => return Err(e),
        }
    }
    loaded.finish_trace()
}

fn is_context_overflow(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<lynx::Error>(),
            Some(lynx::Error::ContextOverflow { .. })
        )
    })
}

// ----------------------------------------------------------------- inspect

fn inspect(path: &Path) -> anyhow::Result<()> {
    let loaded = load_model(path)?;
    let c = &loaded.model.config;
    println!("path:            {}", loaded.path.display());
    println!("format:          {}", format_name(loaded.format));
    println!("architecture:    {}", c.arch.name());
    println!("layers:          {}", c.num_layers);
    println!("hidden size:     {}", c.hidden_size);
    println!(
        "attention:       {} heads, {} kv heads, head dim {}",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocab:           {}", c.vocab_size);
    println!("context length:  {}", c.max_position_embeddings);
    println!("rope theta:      {}", c.rope_theta);
    if let Some(w) = c.sliding_window {
        println!("sliding window:  {w}");
    }
    match &c.moe {
        None => println!("experts:         dense (MLP intermediate size {})", c.intermediate_size),
        Some(m) => {
            println!(
                "experts:         E={} top-k={} expert intermediate size {}",
                m.num_experts, m.top_k, m.expert_intermediate_size
            );
            println!(
                "routing:         {}, {}",
                if m.routing.softmax_then_topk {
                    "softmax then top-k"
                } else {
                    "top-k then softmax"
                },
                if m.routing.renormalize {
                    "renormalised"
                } else {
                    "not renormalised"
                }
            );
            match m.shared_expert_intermediate_size {
                Some(i) => println!("shared expert:   intermediate size {i}"),
                None => println!("shared expert:   none"),
            }
            if m.dense_layers.is_empty() {
                println!("dense layers:    none");
            } else {
                println!(
                    "dense layers:    {:?} (MLP intermediate size {})",
                    m.dense_layers, c.intermediate_size
                );
            }
        }
    }
    let p = param_counts(c);
    println!("parameters:      {} ({})", human_count(p.total), p.total);
    println!("active/token:    {} ({})", human_count(p.active), p.active);

    println!("tensors:         {}", loaded.tensors.len());
    let total_bytes: u64 = loaded.tensors.iter().map(|t| t.bytes as u64).sum();
    println!("tensor bytes:    {}", human_bytes(total_bytes));
    for (dtype, count, bytes) in dtype_histogram(&loaded.tensors) {
        println!("  {dtype:<8} {count:>6} tensors  {:>10}", human_bytes(bytes));
    }
    Ok(())
}

fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::HfSafetensors => "Hugging Face safetensors directory",
        ModelFormat::Gguf => "GGUF",
    }
}

/// Tensor count and bytes per dtype, largest share first.
fn dtype_histogram(tensors: &[TensorInfo]) -> Vec<(String, usize, u64)> {
    let mut by_dtype: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in tensors {
        let e = by_dtype.entry(t.dtype.as_str()).or_default();
        e.0 += 1;
        e.1 += t.bytes as u64;
    }
    let mut rows: Vec<(String, usize, u64)> = by_dtype.into_iter().map(|(d, (n, b))| (d.to_string(), n, b)).collect();
    rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    rows
}

#[derive(Debug, PartialEq, Eq)]
struct ParamCounts {
    total: u64,
    /// Parameters one token's forward pass uses: everything except the
    /// routed experts it was not sent to.
    active: u64,
}

/// Parameter counts from the configuration alone, so that they describe
/// the architecture independently of quantisation or file layout.
fn param_counts(c: &ModelConfig) -> ParamCounts {
    use lynx::config::QkNorm;
    let n = |x: usize| x as u64;
    let (v, h) = (n(c.vocab_size), n(c.hidden_size));
    let q = n(c.num_heads * c.head_dim);
    let kv = n(c.num_kv_heads * c.head_dim);

    let embeddings = v * h + if c.tie_word_embeddings { 0 } else { v * h };
    let mut attention = h * q + 2 * h * kv + q * h;
    if c.attention_bias {
        attention += q + 2 * kv;
    }
    attention += match c.qk_norm {
        QkNorm::None => 0,
        QkNorm::Full => q + kv,
        QkNorm::PerHead => 2 * n(c.head_dim),
    };
    let norms = 2 * h;
    let dense_mlp = 3 * h * n(c.intermediate_size);

    let mut total = embeddings + h; // The final norm.
    let mut active = total;
    for layer in 0..c.num_layers {
        let shared = attention + norms;
        let (layer_total, layer_active) = match &c.moe {
            Some(m) if c.is_moe_layer(layer) => {
                let expert = 3 * h * n(m.expert_intermediate_size);
                let router = n(m.num_experts) * h;
                // The shared expert and its scalar gate run for every token.
                let always = router + m.shared_expert_intermediate_size.map_or(0, |i| 3 * h * n(i) + h);
                (always + n(m.num_experts) * expert, always + n(m.top_k) * expert)
            }
            _ => (dense_mlp, dense_mlp),
        };
        total += shared + layer_total;
        active += shared + layer_active;
    }
    ParamCounts { total, active }
}

fn human_count(x: u64) -> String {
    let x = x as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        format!("{x}")
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{x:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lynx::config::{Arch, MoeConfig, QkNorm, RopeStyle, Routing};

    fn llama_135m() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            intermediate_size: 1536,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_style: RopeStyle::NeoX,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: QkNorm::None,
            moe: None,
            clip_qkv: None,
            sliding_window: None,
        }
    }

    #[test]
    fn smollm2_135m_parameter_count() {
        // The published count of SmolLM2-135M.
        let p = param_counts(&llama_135m());
        assert_eq!(p.total, 134_515_008);
        assert_eq!(p.active, p.total);
    }

    #[test]
    fn mixtral_8x7b_parameter_counts() {
        let c = ModelConfig {
            arch: Arch::Mixtral,
            vocab_size: 32000,
            hidden_size: 4096,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            intermediate_size: 14336,
            rope_theta: 1e6,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            moe: Some(MoeConfig {
                num_experts: 8,
                top_k: 2,
                expert_intermediate_size: 14336,
                routing: Routing {
                    softmax_then_topk: true,
                    renormalize: true,
                },
                shared_expert_intermediate_size: None,
                dense_layers: vec![],
            }),
            ..llama_135m()
        };
        let p = param_counts(&c);
        // Mixtral-8x7B's published total (46.7B) and active (12.9B) counts.
        assert_eq!(p.total, 46_702_792_704);
        assert_eq!(p.active, 12_879_925_248);
    }

    #[test]
    fn histogram_sorts_by_bytes() {
        let t = |dtype: &str, bytes| TensorInfo {
            name: "x".into(),
            dtype: dtype.into(),
            shape: vec![1],
            bytes,
        };
        let rows = dtype_histogram(&[t("F32", 10), t("Q4_1", 100), t("F32", 5)]);
        assert_eq!(rows, vec![("Q4_1".to_string(), 1, 100), ("F32".to_string(), 2, 15)]);
    }

    #[test]
    fn cli_parses_and_rejects_unknown_device() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "lynx", "generate", "m.gguf", "--prompt", "hi", "--stop", "a", "--stop", "b",
        ])
        .unwrap();
        match cli.command {
            Command::Generate(g) => {
                assert_eq!(g.run.stop, ["a", "b"]);
                assert_eq!(g.run.device, Device::Auto);
                assert_eq!(g.run.model.as_deref(), Some(Path::new("m.gguf")));
            }
            _ => panic!("expected generate"),
        }
        assert!(Cli::try_parse_from(["lynx", "chat", "--device", "cpu"]).is_ok());
        assert!(Cli::try_parse_from(["lynx", "chat", "--device", "tpu"]).is_err());
        assert!(Cli::try_parse_from(["lynx", "generate", "--prompt", "x"]).is_ok());
    }
}
