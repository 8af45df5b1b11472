//! The HTTP server under failure and abuse, on the CPU engine (no GPU
//! needed): an engine that panics mid-generation ends every request with
//! an error and turns the server unhealthy; a client that stalls its
//! request line, its body or its keep-alive connection is cut off; a
//! connection over the cap gets a 503 while the others are still served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lynx::generate::{Engine, StepOutput, StepSpec};
use lynx::serving::SchedulerConfig;
use lynx::{Model, ModelConfig, Sequence, Tokenizer};
use lynx_cli::server::http_client::{SseStream, request};
use lynx_cli::server::{Server, ServerConfig};
use lynx_tests::wait_for;

/// Bounds every client call, so that a broken server fails a test instead
/// of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

struct Demo {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
}

/// The demo MoE on the CPU engine, loaded once for every test here.
fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| {
        let mut lm = lynx::load(&lynx::loader::demo_moe_gguf_path()).expect("load the demo MoE");
        let tok = Arc::new(lm.tokenizer.take().expect("the demo MoE has a tokenizer"));
        Demo {
            model: Arc::new(lm.model),
            tok,
        }
    })
}

fn config() -> ServerConfig {
    ServerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        model_id: "demo".into(),
        ..ServerConfig::default()
    }
}

/// The CPU engine, except that its `panic_on`-th forward pass waits for
/// `release` and then panics.
struct PanicOn {
    inner: Arc<Model>,
    panic_on: usize,
    calls: AtomicUsize,
    release: AtomicBool,
}

impl Engine for PanicOn {
    type Seq = Sequence;
    fn config(&self) -> &ModelConfig {
        &self.inner.config
    }
    fn new_sequence(&self) -> Sequence {
        self.inner.new_sequence()
    }
    async fn run(&self, batch: &mut [(&mut Sequence, &[u32])], spec: StepSpec) -> lynx::Result<StepOutput> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.panic_on {
            let t0 = Instant::now();
            while !self.release.load(Ordering::SeqCst) && t0.elapsed() < IO_TIMEOUT {
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("injected failure on forward pass {n}");
        }
        self.inner.run(batch, spec)
    }
}

#[test]
fn an_engine_panic_fails_every_request_and_the_server_turns_unhealthy() {
    let d = demo();
    // Forward 1 prefills the streamed request, 2 decodes its first step,
    // 3 panics while a second request waits in the queue (batch of one).
    let engine = Arc::new(PanicOn {
        inner: d.model.clone(),
        panic_on: 3,
        calls: AtomicUsize::new(0),
        release: AtomicBool::new(false),
    });
    let cfg = ServerConfig {
        scheduler: SchedulerConfig {
            max_batch: 1,
            max_queue: 4,
        },
        ..config()
    };
    let server = Server::start(cfg, engine.clone(), d.tok.clone(), None).expect("start the server");
    let addr = server.addr();
    assert_eq!(request(addr, "GET", "/health", None, IO_TIMEOUT).unwrap().status, 200);

    let streamed = br#"{"prompt":"Once upon a time","max_tokens":32,"ignore_eos":true,"stream":true}"#;
    let stream = SseStream::open(addr, "POST", "/v1/completions", Some(streamed), IO_TIMEOUT).unwrap();
    assert_eq!(stream.status, 200);
    wait_for(&server, "the streamed request to run", |s| s.running == 1);
    let queued = std::thread::spawn(move || {
        let body = br#"{"prompt":"The capital of France is","max_tokens":8}"#;
        request(addr, "POST", "/v1/completions", Some(body), IO_TIMEOUT).unwrap()
    });
    wait_for(&server, "the second request to queue", |s| s.queued == 1);
    engine.release.store(true, Ordering::SeqCst);

    // The running request's stream ends with an error event, no [DONE].
    let rest = stream.rest().unwrap();
    assert!(
        rest.contains("engine panicked") && rest.contains("injected failure"),
        "{rest}"
    );
    assert!(!rest.contains("[DONE]"), "{rest}");
    // The queued one gets a 5xx with an OpenAI error body.
    let r = queued.join().unwrap();
    assert!(r.status >= 500, "queued request: {} {}", r.status, r.text());
    let e = r.json().unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("engine panicked"),
        "{e}"
    );
    // New requests get 503, and so does the health check.
    let body = br#"{"prompt":"hi","max_tokens":2}"#;
    let r = request(addr, "POST", "/v1/completions", Some(body), IO_TIMEOUT).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "engine_failed");
    let r = request(addr, "GET", "/health", None, IO_TIMEOUT).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("engine panicked"), "{}", r.text());
    assert_eq!(server.stats().failed, 2, "{:?}", server.stats());
}

/// Reads from `s` until the server closes the connection, and returns what
/// it sent and how long that took; fails if it stays open past `limit`.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the connection was still open after {:?} ({e}); received: {}",
                t0.elapsed(),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
}

fn health_ok(addr: SocketAddr) {
    let r = request(addr, "GET", "/health", None, IO_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn stalled_request_lines_bodies_and_idle_connections_are_cut_off() {
    let d = demo();
    let cfg = ServerConfig {
        header_read_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..config()
    };
    let server = Server::start(cfg, d.model.clone(), d.tok.clone(), None).expect("start the server");
    let addr = server.addr();

    // A slowloris: half a request line, then nothing.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"POST /v1/compl").unwrap();
    // Other clients are served meanwhile.
    health_ok(addr);
    let (_, took) = read_until_closed(&mut slow, Duration::from_secs(5));
    assert!(took < Duration::from_secs(3), "slowloris closed only after {took:?}");

    // Headers in time, then half the body and a stall: 408.
    let mut slow_body = TcpStream::connect(addr).unwrap();
    slow_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        .unwrap();
    let (got, took) = read_until_closed(&mut slow_body, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("body_timeout"), "{got}");
    assert!(took < Duration::from_secs(3), "stalled body answered after {took:?}");

    // A keep-alive connection that served one request and then idles.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (got, took) = read_until_closed(&mut idle, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        took < Duration::from_secs(3),
        "idle connection closed only after {took:?}"
    );

    // And a normal generation still succeeds.
    let body = br#"{"prompt":"The capital of France is","max_tokens":2}"#;
    let r = request(addr, "POST", "/v1/completions", Some(body), IO_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["usage"]["completion_tokens"], 2);
}

#[test]
fn the_idle_watchdog_closes_idle_connections_but_spares_a_long_request() {
    // A whole (non-streamed) reply moves no bytes while it is generated;
    // it must outlive an idle timeout shorter than the generation.
    let d = demo();
    let cfg = ServerConfig {
        idle_timeout: Duration::from_millis(100),
        ..config()
    };
    let server = Server::start(cfg, d.model.clone(), d.tok.clone(), None).expect("start the server");
    // An idle keep-alive connection is closed by the watchdog, well before
    // the header-read timeout (10 s by default) could do it.
    let mut idle = TcpStream::connect(server.addr()).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (got, took) = read_until_closed(&mut idle, Duration::from_secs(8));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        took < Duration::from_secs(3),
        "idle connection closed only after {took:?}"
    );
    let body = br#"{"prompt":"Once upon a time","max_tokens":24,"ignore_eos":true}"#;
    let t0 = Instant::now();
    let r = request(server.addr(), "POST", "/v1/completions", Some(body), IO_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["usage"]["completion_tokens"], 24);
    assert!(
        t0.elapsed() > Duration::from_millis(100),
        "the generation was too quick to test the watchdog"
    );
}

#[test]
fn connections_over_the_cap_get_503_and_the_others_are_still_served() {
    let d = demo();
    let cfg = ServerConfig {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        ..config()
    };
    let server = Server::start(cfg, d.model.clone(), d.tok.clone(), None).expect("start the server");
    let addr = server.addr();
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Give the accept loop time to hand both their permits.
    std::thread::sleep(Duration::from_millis(200));
    let mut over = TcpStream::connect(addr).unwrap();
    let (got, took) = read_until_closed(&mut over, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("too_many_connections"), "{got}");
    assert!(took < Duration::from_secs(2), "the refusal took {took:?}");
    // One held connection closes; its place frees up for a real client.
    drop(held);
    let t0 = Instant::now();
    loop {
        let r = request(addr, "GET", "/health", None, IO_TIMEOUT).unwrap();
        if r.status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still refused: {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
