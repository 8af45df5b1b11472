//! `lynx serve`: the OpenAI-compatible HTTP server (`lynx_cli::server`), and
//! with `--bench` a load measurement of it over loopback. This file parses
//! the flags, loads the model and prints; the server is the library's.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;

use lynx::generate::Engine;
use lynx::metrics::StepMetrics;
use lynx::selection::ExpertPolicy;
use lynx::serving::SchedulerConfig;
use lynx_cli::server::{Server, ServerConfig, load};

/// The fewest requests a --bench row times, so that its percentiles mean
/// something.
const MIN_BENCH_REQUESTS: usize = 16;

#[derive(Args)]
pub struct ServeArgs {
    /// A Hugging Face checkpoint directory or a .gguf file [default: the
    /// default model].
    pub model: Option<PathBuf>,
    /// Where to run the model: auto (the GPU engine, or the CPU engine with
    /// a notice when this machine has no GPU adapter), gpu or cpu.
    #[arg(long, value_enum, default_value_t = super::Device::Auto)]
    pub device: super::Device,
    /// Re-store the weight matrices in this format after loading.
    #[arg(long, value_enum)]
    pub quant: Option<super::QuantFormat>,
    /// Address to listen on; the default keeps the server private to this
    /// machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Expert-selection policy of decode steps: exact, lynx, oea, oea=K0,
    /// topk=N or lynx:alpha=A,beta=B,threshold=T. With --bench, a
    /// comma-separated list measured one after another.
    #[arg(long, default_value = "exact", value_name = "POLICY")]
    pub experts: String,
    /// The model id clients name in requests [default: the model file's
    /// name without extension].
    #[arg(long)]
    pub model_id: Option<String>,
    /// The most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// The most requests waiting for a batch slot; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The most tokens a request may ask for (`max_tokens`); more is a 400.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Tokens generated when a request does not set `max_tokens` [default:
    /// 256, or --max-tokens if that is less].
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// The longest prompt accepted, in tokens (the model's context also
    /// bounds it).
    #[arg(long, default_value_t = 8192)]
    pub max_prompt_tokens: usize,
    /// The largest request body accepted, in bytes; more is a 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a request may take from arrival to its end; a request still
    /// running then ends with an error and frees its slot.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub request_timeout: f64,
    /// Seconds a client has to send a request's line and headers; a slower
    /// one (e.g. a slowloris that sends half a request line and stalls) is
    /// disconnected.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body after its headers; a
    /// slower one gets 408.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub body_timeout: f64,
    /// Seconds a keep-alive connection may stay open with no request
    /// running and no bytes moving before it is closed.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub idle_timeout: f64,
    /// The most connections open at once; more get a 503 and are closed.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Instead of serving, measure the server over loopback with these
    /// numbers of concurrent streaming clients (comma-separated), for each
    /// policy in --experts, and print requests/s and latency percentiles.
    #[arg(long, value_delimiter = ',', value_name = "CLIENTS")]
    pub bench: Vec<usize>,
    /// Requests each client sends one after another in a --bench run; at
    /// low client counts more, so that every row times at least 16.
    #[arg(long, default_value_t = 2)]
    pub bench_requests: usize,
    /// Tokens per reply in a --bench run (EOS is ignored, so every reply
    /// has exactly this many).
    #[arg(long, default_value_t = 16)]
    pub bench_tokens: usize,
}

impl ServeArgs {
    fn config(&self, model_id: String, policy: &ExpertPolicy) -> anyhow::Result<ServerConfig> {
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            bail!("--request-timeout must be a positive number of seconds");
        }
        for (flag, v) in [
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            // A bound keeps Duration::from_secs_f64 from panicking.
            if !(v.is_finite() && v > 0.0 && v <= 1e9) {
                bail!("{flag} must be a positive number of seconds");
            }
        }
        if self.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        let config = ServerConfig {
            addr: SocketAddr::new(self.host, self.port),
            model_id,
            policy: *policy,
            scheduler: SchedulerConfig {
                max_batch: self.max_batch,
                max_queue: self.max_queue,
            },
            max_tokens: self.max_tokens,
            default_max_tokens: self.default_max_tokens.unwrap_or(self.max_tokens.min(256)),
            max_prompt_tokens: self.max_prompt_tokens,
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_secs_f64(self.request_timeout),
            header_read_timeout: Duration::from_secs_f64(self.header_timeout),
            body_timeout: Duration::from_secs_f64(self.body_timeout),
            idle_timeout: Duration::from_secs_f64(self.idle_timeout),
            max_connections: self.max_connections,
            ..ServerConfig::default()
        };
        config.validate()?;
        Ok(config)
    }

    fn policies(&self) -> anyhow::Result<Vec<ExpertPolicy>> {
        let list: Vec<&str> = if self.bench.is_empty() {
            vec![self.experts.as_str()]
        } else {
            // A policy such as `lynx:alpha=1,beta=2,threshold=0` contains
            // commas itself, so a list item starts only at a policy name.
            split_policies(&self.experts)
        };
        list.iter()
            .map(|p| {
                p.parse::<ExpertPolicy>()
                    .with_context(|| "invalid --experts".to_string())
            })
            .collect()
    }
}

/// Splits `exact,lynx:alpha=1,beta=2,threshold=0,topk=2` at the commas that
/// start a new policy.
fn split_policies(s: &str) -> Vec<&str> {
    let starts_policy = |rest: &str| ["exact", "lynx", "oea", "topk="].iter().any(|p| rest.starts_with(p));
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in s.match_indices(',') {
        if starts_policy(&s[i + 1..]) {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

pub fn serve_cmd(args: &ServeArgs) -> anyhow::Result<()> {
    let policies = args.policies()?;
    if args.bench.contains(&0) {
        bail!("--bench needs positive client counts");
    }
    if !args.bench.is_empty() && (args.bench_requests == 0 || args.bench_tokens == 0) {
        bail!("--bench-requests and --bench-tokens must be at least 1");
    }
    let path = match &args.model {
        Some(p) => p.clone(),
        None => lynx::loader::default_model_path().context("no MODEL given, and no default model could be found")?,
    };
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "lynx".into()),
    };
    // Check the limits before the slow load.
    args.config(model_id.clone(), &policies[0])?;
    if args.device == super::Device::Cpu && policies.iter().any(|p| !p.is_exact()) {
        bail!("expert policies other than `exact` need `--device gpu`; the CPU reference serves with exact routing");
    }
    let needs_gpu = policies
        .iter()
        .find(|p| !p.is_exact())
        .map(|p| format!("--experts {p}"));
    let ctx = super::open_gpu(args.device, needs_gpu.as_deref())?;
    let mut lm = super::load_model(&path)?;
    if let Some(q) = args.quant {
        lm.model
            .requantize(q.into())
            .context("failed to re-store the weights")?;
    }
    super::require_tokenizer(&lm, "serve")?;
    let tok = Arc::new(
        lm.tokenizer
            .take()
            .ok_or_else(|| anyhow!("the model has no tokenizer"))?,
    );

    match ctx {
        None => {
            let engine = Arc::new(lm.model);
            if args.bench.is_empty() {
                serve(args.config(model_id, &policies[0])?, engine, tok, None)
            } else {
                bench(args, &model_id, engine, tok, &policies, || None)
            }
        }
        Some(ctx) => {
            let gpu = Arc::new(super::upload_to_gpu(&lm, ctx)?);
            drop(lm);
            for p in &policies {
                p.resolve_for(&gpu.config)
                    .with_context(|| format!("invalid --experts `{p}` for this model"))?;
            }
            if args.bench.is_empty() {
                let rx = gpu.subscribe();
                serve(args.config(model_id, &policies[0])?, gpu, tok, Some(rx))
            } else {
                let g = gpu.clone();
                bench(args, &model_id, gpu, tok, &policies, move || Some(g.subscribe()))
            }
        }
    }
}

fn serve<E: Engine + Send + Sync + 'static>(
    config: ServerConfig,
    engine: Arc<E>,
    tok: Arc<lynx::Tokenizer>,
    metrics: Option<std::sync::mpsc::Receiver<Arc<StepMetrics>>>,
) -> anyhow::Result<()> {
    let summary = format!(
        "model `{}`, experts {}, batch {}, queue {}",
        config.model_id, config.policy, config.scheduler.max_batch, config.scheduler.max_queue
    );
    let server = Server::start(config, engine, tok, metrics).context("failed to start the server")?;
    eprintln!("[lynx serve: http://{} ({summary}); Ctrl-C stops]", server.addr());
    server.wait();
    Ok(())
}

/// Serves on a free loopback port once per policy and runs the load
/// generator at each client count against it.
fn bench<E: Engine + Send + Sync + 'static>(
    args: &ServeArgs,
    model_id: &str,
    engine: Arc<E>,
    tok: Arc<lynx::Tokenizer>,
    policies: &[ExpertPolicy],
    subscribe: impl Fn() -> Option<std::sync::mpsc::Receiver<Arc<StepMetrics>>>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs_f64(args.request_timeout);
    println!(
        "streaming /v1/completions requests with short prompts, {} per client (at least {MIN_BENCH_REQUESTS} per row), \
         {} tokens each (EOS ignored), max batch {}",
        args.bench_requests, args.bench_tokens, args.max_batch
    );
    println!(
        "{:<8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "experts", "clients", "requests", "req/s", "p50 s", "p99 s", "ttft p50", "tok/s", "experts"
    );
    // Policies alternate within each client count, rather than one policy
    // running all its rows first, so that a change in the machine's other
    // load during the run does not fall on one policy alone.
    for &clients in &args.bench {
        for policy in policies {
            let mut config = args.config(model_id.to_string(), policy)?;
            config.addr = SocketAddr::new(args.host, 0);
            // Every client's request must fit in the queue at once.
            config.scheduler.max_queue = config.scheduler.max_queue.max(clients);
            let server = Server::start(config, engine.clone(), tok.clone(), subscribe())
                .context("failed to start the server")?;
            let addr = server.addr();
            // A first request compiles the GPU pipelines outside the timing.
            load::stream_completion(addr, &load::completion_body(0, 0, 2), timeout)
                .map_err(|e| anyhow!("warm-up request: {e}"))?;
            let steps = subscribe();
            let spec = load::LoadSpec {
                clients,
                requests_per_client: args.bench_requests.max(MIN_BENCH_REQUESTS.div_ceil(clients)),
                max_tokens: args.bench_tokens,
                timeout,
            };
            let r = load::run(addr, &spec);
            server.shutdown();
            if let Some(e) = r.errors.first() {
                bail!(
                    "{} of {} requests failed at {clients} clients; first: {e}",
                    r.errors.len(),
                    r.errors.len() + r.samples.len()
                );
            }
            // Mean distinct experts per layer over the run's decode steps.
            let experts = steps.map(|rx| {
                let v: Vec<f64> = rx
                    .try_iter()
                    .filter(|m| m.decode)
                    .map(|m| m.mean_distinct_selected())
                    .collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            });
            println!(
                "{:<8} {:>7} {:>8} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>8}",
                policy.to_string(),
                clients,
                r.samples.len(),
                r.requests_per_s(),
                r.latency_quantile(0.5),
                r.latency_quantile(0.99),
                r.first_token_quantile(0.5),
                r.tokens_per_s(),
                experts.map_or("-".into(), |e| format!("{e:.2}")),
            );
        }
    }
    println!(
        "latency: request sent to [DONE]; ttft: to the first content; experts: mean distinct experts per MoE layer per decode step"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_lists_split_at_policy_names() {
        assert_eq!(split_policies("exact,lynx"), ["exact", "lynx"]);
        assert_eq!(
            split_policies("exact,lynx:alpha=1,beta=2,threshold=0,topk=2,oea"),
            ["exact", "lynx:alpha=1,beta=2,threshold=0", "topk=2", "oea"]
        );
        assert_eq!(split_policies("lynx"), ["lynx"]);
    }
}
