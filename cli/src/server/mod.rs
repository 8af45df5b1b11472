//! An OpenAI-compatible HTTP server over the continuous-batching loop
//! ([`lynx::serving::Scheduler`]), for `lynx serve` and for tests that
//! start it in-process.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions`
//! (streamed as server-sent events with `"stream": true`), `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text) and
//! `GET /v1/experts/stream` (server-sent events, one JSON
//! [`StepMetrics`] per engine step, for a remote viewer).
//!
//! Threads: the scheduler loop runs on its own thread and owns the batch;
//! HTTP runs on a small tokio runtime. Each request's events cross from the
//! loop to its response through a blocking forwarder task. The response
//! (an SSE stream or a waiting handler) holds the request's
//! [`CancelGuard`]; when the client goes away hyper drops the response, the
//! guard with it, and the loop frees the request's batch slot before its
//! next step. The request timeout drops the guard the same way.

mod api;
pub mod http_client;
pub mod load;
mod metrics;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub use api::{
    ApiError, ChatRequest, CommonParams, CompletionRequest, MAX_STOP_SEQUENCES, Prompt, RequestRules,
    parse_chat_request, parse_completion_request,
};
pub use metrics::{ExpertHub, HttpCounters};

use lynx::config::ModelConfig;
use lynx::generate::{Engine, FinishReason, check_prompt};
use lynx::metrics::StepMetrics;
use lynx::selection::ExpertPolicy;
use lynx::serving::{CancelGuard, Completion, Event, Scheduler, SchedulerConfig, SchedulerStats, SubmitError};
use lynx::tokenizer::{ChatMessage, Tokenizer};

/// How often an idle SSE stream sends a comment, so that proxies keep it
/// open and a vanished client is noticed while its request waits.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The SSE keep-alive interval: [`SSE_KEEP_ALIVE`], or half the idle
/// timeout when that is shorter, so the idle watchdog never cuts a stream.
fn sse_keep_alive(config: &ServerConfig) -> Duration {
    SSE_KEEP_ALIVE
        .min(config.idle_timeout / 2)
        .max(Duration::from_millis(1))
}

/// How long shutdown waits for open connections before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the server's {what}: {source}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid server configuration: {0}")]
    Config(String),
}

/// The server's limits and identity.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen; loopback by default, port 0 picks a free port.
    pub addr: SocketAddr,
    /// The model id clients name (and `/v1/models` lists).
    pub model_id: String,
    /// The expert-selection policy of the decode steps (checked against
    /// the model at start), as shown by `/metrics` and `/v1/models`.
    pub policy: ExpertPolicy,
    /// The continuous-batching limits: the batch size, and the queue
    /// beyond which requests get 429.
    pub scheduler: SchedulerConfig,
    /// The most tokens one request may ask for; more is a 400.
    pub max_tokens: usize,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: usize,
    /// The longest prompt accepted, in tokens (also bounded by the model's
    /// context); longer is a 400.
    pub max_prompt_tokens: usize,
    /// The largest request body accepted, in bytes; larger is a 413.
    pub max_body_bytes: usize,
    /// Time from a request's submission to the scheduler (its wait in the
    /// queue included) to its end; a request still running then ends with
    /// an error and frees its slot.
    pub request_timeout: Duration,
    /// Threads of the HTTP runtime. HTTP work is light next to the model,
    /// so two are plenty.
    pub http_threads: usize,
    /// Time a client has to send a request's line and headers, from the
    /// moment the server starts reading them; a slower client (a slowloris
    /// that sends half a request line and stalls) is disconnected.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in;
    /// a slower one gets 408.
    pub body_timeout: Duration,
    /// Time a connection may stay open with no request running and no
    /// bytes moving either way (an idle keep-alive connection); then it is
    /// closed. SSE streams send a keep-alive comment at least twice per
    /// idle timeout, so a quiet stream is never taken for idle.
    pub idle_timeout: Duration,
    /// The most connections open at once. A connection beyond it gets a
    /// 503 with an OpenAI error body and is closed at once, so that a flood
    /// of connections cannot starve the clients already served.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model_id: "lynx".into(),
            policy: ExpertPolicy::Exact,
            scheduler: SchedulerConfig::default(),
            max_tokens: 4096,
            default_max_tokens: 256,
            max_prompt_tokens: 8192,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(600),
            http_threads: 2,
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

impl ServerConfig {
    /// Checks the limits, so that a command line can refuse bad flags
    /// before it loads a model.
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |m: &str| Err(ServeError::Config(m.into()));
        if self.scheduler.max_batch == 0 {
            return bad("the batch size must be at least 1");
        }
        if self.max_tokens == 0 || self.default_max_tokens == 0 || self.default_max_tokens > self.max_tokens {
            return Err(ServeError::Config(format!(
                "the default max tokens ({}) must be between 1 and the max tokens ({})",
                self.default_max_tokens, self.max_tokens
            )));
        }
        if self.max_prompt_tokens == 0 || self.max_body_bytes == 0 || self.http_threads == 0 {
            return bad("the prompt limit, body limit and HTTP threads must be at least 1");
        }
        if self.request_timeout.is_zero() {
            return bad("the request timeout must be positive");
        }
        if self.header_read_timeout.is_zero() || self.body_timeout.is_zero() {
            return bad("the header and body timeouts must be positive");
        }
        if self.idle_timeout.is_zero() {
            return bad("the idle timeout must be positive");
        }
        if self.max_connections == 0 {
            return bad("the connection limit must be at least 1");
        }
        if self.model_id.is_empty() {
            return bad("the model id must not be empty");
        }
        Ok(())
    }
}

/// A running server. Dropping it shuts it down.
pub struct Server {
    addr: SocketAddr,
    sched: Arc<Scheduler>,
    http: Arc<HttpCounters>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `config.addr`, starts the scheduler loop over `engine` and the
    /// HTTP server, and returns once requests are accepted. `expert_metrics`
    /// (from `GpuModel::subscribe`) feeds `/metrics`' per-layer gauges and
    /// `/v1/experts/stream`; without it those are absent.
    pub fn start<E>(
        config: ServerConfig,
        engine: Arc<E>,
        tokenizer: Arc<Tokenizer>,
        expert_metrics: Option<Receiver<Arc<StepMetrics>>>,
    ) -> Result<Server, ServeError>
    where
        E: Engine + Send + Sync + 'static,
    {
        config.validate()?;
        config
            .policy
            .resolve_for(engine.config())
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let sched = Arc::new(Scheduler::new(config.scheduler).map_err(|e| ServeError::Config(e.to_string()))?);
        sched.set_policy(config.policy);
        let hub = match expert_metrics {
            Some(rx) => Some(ExpertHub::start(rx).map_err(|source| ServeError::Start {
                what: "metrics thread",
                source,
            })?),
            None => None,
        };
        let listener = TcpListener::bind(config.addr).map_err(|source| ServeError::Bind {
            addr: config.addr,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.addr,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServeError::Bind { addr, source })?;

        // Every request in flight parks one blocking forwarder, so the pool
        // must hold all of them (queue plus batch) and some tokenising work.
        let blocking = config.scheduler.max_queue + config.scheduler.max_batch + 64;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.http_threads)
            .max_blocking_threads(blocking)
            .thread_name("lynx-http")
            .enable_all()
            .build()
            .map_err(|source| ServeError::Start {
                what: "async runtime",
                source,
            })?;
        let listener = {
            let _in_runtime = rt.enter();
            tokio::net::TcpListener::from_std(listener).map_err(|source| ServeError::Bind { addr, source })?
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let http = Arc::new(HttpCounters::default());
        let cfg = engine.config();
        let app = Arc::new(App {
            sched: sched.clone(),
            tok: tokenizer.clone(),
            rules: RequestRules {
                model_id: config.model_id.clone(),
                max_tokens: config.max_tokens,
            },
            model: cfg.clone(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            http: http.clone(),
            hub,
            shutdown: shutdown_rx.clone(),
            config,
        });

        let mut threads = Vec::new();
        let runner = sched.clone();
        threads.push(
            std::thread::Builder::new()
                .name("lynx-scheduler".into())
                .spawn(move || runner.run(&*engine, &tokenizer))
                .map_err(|source| ServeError::Start {
                    what: "scheduler thread",
                    source,
                })?,
        );
        let limits = ConnLimits::of(&app.config);
        let router = router(app);
        let spawned = std::thread::Builder::new()
            .name("lynx-http-main".into())
            .spawn(move || {
                rt.block_on(serve_until_shutdown(listener, router, shutdown_rx, limits));
                // Forwarders of abandoned requests end when the loop lets go.
                rt.shutdown_timeout(Duration::from_secs(1));
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(source) => {
                sched.shutdown();
                return Err(ServeError::Start {
                    what: "HTTP thread",
                    source,
                });
            }
        }
        Ok(Server {
            addr,
            sched,
            http,
            shutdown,
            threads,
        })
    }

    /// The address the server listens on (with the real port when the
    /// configuration asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> SchedulerStats {
        self.sched.stats()
    }

    pub fn counters(&self) -> &HttpCounters {
        &self.http
    }

    /// Blocks for as long as the server runs, which is until the process
    /// ends: `lynx serve` runs until it is interrupted.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting requests, ends the running ones with an error, and
    /// waits for the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        self.sched.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The per-connection limits of the accept loop (see [`ServerConfig`]).
#[derive(Clone, Copy, Debug)]
struct ConnLimits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
}

impl ConnLimits {
    fn of(config: &ServerConfig) -> ConnLimits {
        ConnLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        }
    }
}

/// Accepts connections until the shutdown signal, then lets open ones
/// finish for at most [`SHUTDOWN_GRACE`]: a client that keeps a connection
/// open must not hold the process.
///
/// The loop is hyper's HTTP/1 connection builder rather than `axum::serve`
/// because that has no header-read timeout: each connection gets one (the
/// slowloris guard), an idle watchdog (no request running and no bytes
/// moving for `idle_timeout` closes it), and a permit from a semaphore of
/// `max_connections`; a connection that finds none gets a 503 and is
/// closed, so the accept loop itself never waits.
async fn serve_until_shutdown(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: watch::Receiver<bool>,
    limits: ConnLimits,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut stop = shutdown.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: back off briefly
                // rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve_connection(
                    stream,
                    router.clone(),
                    shutdown.clone(),
                    limits,
                    permit,
                ));
            }
            Err(_) => {
                tokio::spawn(refuse_connection(stream, limits.max_connections));
            }
        }
    }
    drop(listener);
    // Every open connection holds a permit until it ends.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(all)).await;
}

/// Answers a connection over the limit with a 503 and closes it, within a
/// short bound so that a client that never reads cannot keep it.
async fn refuse_connection(stream: tokio::net::TcpStream, max: usize) {
    let body = ApiError::server(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the server has {max} connections open, its limit; retry later"),
        "too_many_connections",
    )
    .body()
    .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut rest = reply.as_bytes();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while !rest.is_empty() {
            if stream.writable().await.is_err() {
                return;
            }
            match stream.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
    // Dropping the socket closes it.
}

/// Serves one connection with the header-read timeout and the idle
/// watchdog; `_permit` returns its place under the connection cap when it
/// ends.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnLimits,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = hyper_util::rt::TokioIo::new(ActivityIo {
        inner: stream,
        activity: activity.clone(),
    });
    let running = activity.clone();
    let router = hyper_util::service::TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
        let response = hyper::service::Service::call(&router, req);
        let running = running.clone();
        async move {
            // Counted from the call to the response's head: a long
            // non-streamed generation moves no bytes but is not idle. A
            // streamed body keeps bytes moving (its keep-alive comments).
            running.requests.fetch_add(1, Ordering::SeqCst);
            let response = response.await;
            running.requests.fetch_sub(1, Ordering::SeqCst);
            running.touch();
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = async {
        let check = (limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(check).await;
            if activity.requests.load(Ordering::SeqCst) == 0 && activity.idle_for() >= limits.idle_timeout {
                return;
            }
        }
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        // Dropping the connection closes the socket.
        _ = idle => {}
        // The watch guard that `wait_for` returns is not `Send`, so it is
        // dropped inside this block rather than held across the await below.
        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

/// What a connection's idle watchdog watches: requests being answered, and
/// when bytes last moved.
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start` of the last read or write.
    last_ms: std::sync::atomic::AtomicU64,
    requests: std::sync::atomic::AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
            requests: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::SeqCst);
    }

    fn idle_for(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::SeqCst)))
    }
}

/// A socket that records in [`Activity`] when bytes last moved.
struct ActivityIo {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for ActivityIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl tokio::io::AsyncWrite for ActivityIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The state every handler shares.
struct App {
    sched: Arc<Scheduler>,
    tok: Arc<Tokenizer>,
    rules: RequestRules,
    config: ServerConfig,
    /// The model's description: its context length and vocabulary size
    /// bound the prompts ([`check_prompt`]).
    model: ModelConfig,
    created: u64,
    http: Arc<HttpCounters>,
    hub: Option<Arc<ExpertHub>>,
    shutdown: watch::Receiver<bool>,
}

type Shared = Arc<App>;

fn router(app: Shared) -> Router {
    let limit = app.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(prometheus))
        .route("/v1/experts/stream", get(expert_stream))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn health(State(app): State<Shared>) -> Response {
    if *app.shutdown.borrow() {
        return ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
            "shutting_down",
        )
        .into_response();
    }
    if let Some(why) = app.sched.failure() {
        return ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}"),
            "engine_failed",
        )
        .into_response();
    }
    json_response(StatusCode::OK, &json!({"status": "ok", "model": app.config.model_id}))
}

fn model_card(app: &App) -> Value {
    json!({
        "id": app.config.model_id,
        "object": "model",
        "created": app.created,
        "owned_by": "lynx",
        "context_length": app.model.max_position_embeddings,
        "expert_policy": app.config.policy.to_string(),
    })
}

async fn models(State(app): State<Shared>) -> Response {
    json_response(StatusCode::OK, &json!({"object": "list", "data": [model_card(&app)]}))
}

async fn model(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    if id == app.config.model_id {
        json_response(StatusCode::OK, &model_card(&app))
    } else {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::not_found(format!("the model `{id}` does not exist"))
        }
        .into_response()
    }
}

async fn no_route(method: Method, uri: Uri) -> Response {
    ApiError::not_found(format!("no endpoint {method} {}", uri.path())).into_response()
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} does not accept {method}", uri.path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
    .into_response()
}

async fn prometheus(State(app): State<Shared>) -> Response {
    let text = metrics::render(&metrics::Snapshot {
        model_id: &app.config.model_id,
        policy: &app.config.policy.to_string(),
        max_batch: app.config.scheduler.max_batch,
        max_queue: app.config.scheduler.max_queue,
        stats: app.sched.stats(),
        http: &app.http,
        hub: app.hub.as_deref(),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn expert_stream(State(app): State<Shared>) -> Response {
    let Some(hub) = &app.hub else {
        return ApiError::not_found("this engine reports no expert-selection metrics (the GPU engine does)")
            .into_response();
    };
    let stream = futures_util::stream::unfold(
        (hub.subscribe(), app.shutdown.clone()),
        |(mut rx, mut stop)| async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let got = tokio::select! {
                    r = rx.recv() => r,
                    _ = stop.wait_for(|s| *s) => return None,
                };
                let event = match got {
                    Ok(m) => match serde_json::to_string(&*m) {
                        Ok(data) => SseEvent::default().event("step").data(data),
                        Err(_) => continue,
                    },
                    // A slow viewer skips steps rather than holding memory.
                    Err(RecvError::Lagged(n)) => SseEvent::default().event("lagged").data(n.to_string()),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok::<_, Infallible>(event), (rx, stop)));
            }
        },
    );
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(sse_keep_alive(&app.config)))
        .into_response();
    // The stream is read-only and public to whoever reaches the port, so a
    // browser viewer served from another origin may attach too.
    r.headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

/// Which endpoint a generation answers, for the shape of its responses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

async fn chat_completions(State(app): State<Shared>, request: Request) -> Response {
    let result = async {
        let body = read_body(&app, request).await?;
        let req = parse_chat_request(&body, &app.rules)?;
        let tok = app.tok.clone();
        let ids = blocking(move || encode_chat(&tok, &req.messages)).await??;
        app.clone().generate(ids, "messages", req.params, Endpoint::Chat).await
    }
    .await;
    app.reply(result)
}

async fn completions(State(app): State<Shared>, request: Request) -> Response {
    let result = async {
        let body = read_body(&app, request).await?;
        let req = parse_completion_request(&body, &app.rules)?;
        let ids = match req.prompt {
            // Ids are checked against the vocabulary with the prompt's
            // length, in `generate`.
            Prompt::Tokens(ids) => ids,
            Prompt::Text(text) => {
                let tok = app.tok.clone();
                blocking(move || {
                    tok.encode(&text, true)
                        .map_err(|e| ApiError::invalid("prompt", format!("the prompt could not be tokenized: {e}")))
                })
                .await??
            }
        };
        app.clone()
            .generate(ids, "prompt", req.params, Endpoint::Completion)
            .await
    }
    .await;
    app.reply(result)
}

/// The chat prompt for `messages` ([`Tokenizer::encode_chat`]), with its
/// failure as a 400 that names the `messages` field.
fn encode_chat(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    tok.encode_chat(messages).map_err(|e| {
        let why = match e {
            lynx::Error::ChatTemplate(_) => "the chat template refused the messages",
            _ => "the messages could not be tokenized",
        };
        ApiError::invalid("messages", format!("{why}: {e}"))
    })
}

/// Runs tokenising work off the async threads: a prompt near the body
/// limit takes long enough to stall other connections.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenizing failed: {e}"),
            "internal_error",
        )
    })
}

/// Reads a request's body within `--body-timeout` (and the body limit that
/// `DefaultBodyLimit` put on the request): a client that trickles or stalls
/// its body gets 408 instead of holding the connection.
async fn read_body(app: &App, request: Request) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(app.config.body_timeout, Bytes::from_request(request, &())).await {
        Ok(body) => body.map_err(|r| body_error(app, r)),
        Err(_) => Err(ApiError::server(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within this server's body timeout of {:?}",
                app.config.body_timeout
            ),
            "body_timeout",
        )),
    }
}

/// The error for a body axum could not read: too large (413) or broken.
fn body_error(app: &App, r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is larger than this server's limit of {} bytes",
                app.config.max_body_bytes
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    } else {
        ApiError::bad_body(
            format!("the request body could not be read: {}", r.body_text()),
            "invalid_body",
        )
    }
}

impl App {
    /// Counts a refusal and turns the result into a response.
    fn reply(&self, result: Result<Response, ApiError>) -> Response {
        match result {
            Ok(r) => r,
            Err(e) => {
                if e.status == StatusCode::TOO_MANY_REQUESTS {
                    self.http.queue_full.fetch_add(1, Ordering::Relaxed);
                } else if e.status.is_client_error() {
                    self.http.invalid.fetch_add(1, Ordering::Relaxed);
                }
                e.into_response()
            }
        }
    }

    /// Checks the prompt's length, submits it, and answers with a stream
    /// or, once the request ends, one response.
    async fn generate(
        self: Arc<Self>,
        ids: Vec<u32>,
        param: &'static str,
        params: CommonParams,
        endpoint: Endpoint,
    ) -> Result<Response, ApiError> {
        let too_long = |why: String| ApiError::invalid(param, why).with_code("context_length_exceeded");
        if ids.is_empty() {
            return Err(ApiError::invalid(param, format!("`{param}` tokenizes to nothing")));
        }
        if ids.len() > self.config.max_prompt_tokens {
            return Err(too_long(format!(
                "the prompt has {} tokens; this server accepts at most {}",
                ids.len(),
                self.config.max_prompt_tokens
            )));
        }
        check_prompt(&self.model, &ids).map_err(|e| match e {
            lynx::Error::ContextOverflow { limit, .. } => too_long(format!(
                "the prompt has {} tokens; the model's context holds {limit}, and the reply needs at least one",
                ids.len()
            )),
            e => ApiError::invalid(param, e.to_string()),
        })?;
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let opts = params.options(self.config.default_max_tokens);
        let handle = self.sched.submit(ids, opts).map_err(|e| match e {
            SubmitError::QueueFull(n) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("the server is busy: {n} requests are already waiting; retry later"),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            },
            SubmitError::ShuttingDown => ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
                "shutting_down",
            ),
            SubmitError::Failed(why) => ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the engine failed and the server cannot run requests: {why}"),
                "engine_failed",
            ),
            SubmitError::Invalid(why) => ApiError::invalid(param, why),
        })?;
        let id = format!(
            "{}-{}",
            if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" },
            handle.id
        );
        let (events, guard) = handle.into_parts();
        let (tx, rx) = mpsc::unbounded_channel();
        // The forwarder blocks on the loop's channel and ends with the
        // request: after its last event, when the loop lets a cancelled
        // request go (closing the channel), or when the response is gone.
        tokio::task::spawn_blocking(move || {
            while let Ok(ev) = events.recv() {
                let last = matches!(ev, Event::Done(_) | Event::Error(_));
                if tx.send(ev).is_err() || last {
                    break;
                }
            }
        });
        let shape = Shape {
            id,
            created: now_s(),
            model: self.config.model_id.clone(),
            endpoint,
            include_usage: params.include_usage,
        };
        let req = InFlight {
            app: self,
            rx,
            guard: Some(guard),
            deadline,
            shape,
        };
        if params.stream {
            Ok(req.stream())
        } else {
            req.collect().await
        }
    }
}

/// The fields every response of one request shares.
struct Shape {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn usage(&self, c: &Completion) -> Value {
        json!({
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.tokens.len(),
            "total_tokens": c.prompt_tokens + c.tokens.len(),
        })
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// A streamed chunk carrying new text (`None`: the chat role chunk) or
    /// the finish reason.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (text, finish) {
                    (_, Some(_)) => json!({}),
                    (Some(t), None) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(true, json!([choice]))
    }

    fn complete(&self, c: &Completion) -> Value {
        let finish = finish_reason(c.finish);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => json!({"index": 0, "text": c.text, "logprobs": null, "finish_reason": finish}),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = self.usage(c);
        v
    }
}

/// OpenAI's finish reasons: an EOS token and a stop string are both `stop`.
fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A submitted request on its way back to the client.
struct InFlight {
    app: Shared,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Dropping it cancels the request.
    guard: Option<CancelGuard>,
    deadline: tokio::time::Instant,
    shape: Shape,
}

impl InFlight {
    fn timed_out(&mut self) -> ApiError {
        self.guard = None;
        self.app.http.timed_out.fetch_add(1, Ordering::Relaxed);
        ApiError::server(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the request did not finish within {:?}",
                self.app.config.request_timeout
            ),
            "timeout",
        )
    }

    fn failed(message: String) -> ApiError {
        if message.contains("shutting down") {
            ApiError::server(StatusCode::SERVICE_UNAVAILABLE, message, "shutting_down")
        } else {
            ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, message, "generation_failed")
        }
    }

    /// Waits for the whole completion. If the client leaves, hyper drops
    /// this future and the guard with it.
    async fn collect(mut self) -> Result<Response, ApiError> {
        loop {
            let ev = match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Ok(ev) => ev,
                Err(_) => return Err(self.timed_out()),
            };
            match ev {
                Some(Event::Done(c)) => return Ok(json_response(StatusCode::OK, &self.shape.complete(&c))),
                Some(Event::Error(e)) => return Err(Self::failed(e)),
                Some(Event::Started { .. } | Event::Text(_)) => {}
                None => return Err(Self::failed("the scheduler stopped before the request ended".into())),
            }
        }
    }

    /// The SSE response. If the client leaves, hyper drops the stream and
    /// the guard with it.
    fn stream(self) -> Response {
        let keep_alive = sse_keep_alive(&self.app.config);
        let mut queue = std::collections::VecDeque::new();
        if self.shape.endpoint == Endpoint::Chat {
            queue.push_back(data(&self.shape.chunk(None, None)));
        }
        let state = (self, queue, false);
        let stream = futures_util::stream::unfold(state, |(mut req, mut queue, mut ended)| async move {
            loop {
                if let Some(ev) = queue.pop_front() {
                    return Some((Ok::<_, Infallible>(ev), (req, queue, ended)));
                }
                if ended {
                    return None;
                }
                let got = tokio::select! {
                    ev = req.rx.recv() => Some(ev),
                    _ = tokio::time::sleep_until(req.deadline) => None,
                };
                ended = true;
                match got {
                    None => queue.push_back(data(&req.timed_out().body())),
                    Some(Some(Event::Started { .. })) => ended = false,
                    Some(Some(Event::Text(t))) => {
                        queue.push_back(data(&req.shape.chunk(Some(&t), None)));
                        ended = false;
                    }
                    Some(Some(Event::Done(c))) => {
                        queue.push_back(data(&req.shape.chunk(None, Some(finish_reason(c.finish)))));
                        if req.shape.include_usage {
                            let mut usage = req.shape.envelope(true, json!([]));
                            usage["usage"] = req.shape.usage(&c);
                            queue.push_back(data(&usage));
                        }
                        queue.push_back(SseEvent::default().data("[DONE]"));
                    }
                    Some(Some(Event::Error(e))) => queue.push_back(data(&Self::failed(e).body())),
                    Some(None) => {
                        let e = Self::failed("the scheduler stopped before the request ended".into());
                        queue.push_back(data(&e.body()));
                    }
                }
            }
        });
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(keep_alive))
            .into_response()
    }
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}
