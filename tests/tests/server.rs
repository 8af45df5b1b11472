//! The OpenAI-compatible server, started in-process on a loopback port:
//! 64 concurrent streams that each match their single-request greedy
//! output, a client that disconnects mid-stream and frees its slot, the
//! queue limit (429), request timeouts, the other endpoints, bad input over
//! HTTP, and a fuzz-style test of the request parser.
//!
//! The GPU tests share one upload of the demo MoE and run one at a time
//! (`GPU`), since each drives the whole engine.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use lynx::generate::{FinishReason, GenerateOptions, generate};
use lynx::gpu::GpuModel;
use lynx::selection::ExpertPolicy;
use lynx::serving::SchedulerConfig;
use lynx::{ChatMessage, Tokenizer};
use lynx_cli::server::http_client::{HttpResponse, SseStream, request};
use lynx_cli::server::{RequestRules, Server, ServerConfig, load, parse_chat_request, parse_completion_request};
use lynx_tests::{gpu_ctx, wait_for};
use serde_json::{Value, json};

/// Bounds every read and write of a test request, so a broken server fails
/// the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(180);

struct Demo {
    gpu: Arc<GpuModel>,
    tok: Arc<Tokenizer>,
}

/// Serialises the GPU tests: they share the engine and its policy.
static GPU: Mutex<()> = Mutex::new(());

fn demo() -> Option<(MutexGuard<'static, ()>, &'static Demo)> {
    static DEMO: OnceLock<Option<Demo>> = OnceLock::new();
    let guard = GPU.lock().unwrap_or_else(|p| p.into_inner());
    let demo = DEMO.get_or_init(|| {
        let ctx = gpu_ctx()?;
        let mut lm = lynx::load(&lynx::loader::demo_moe_gguf_path()).expect("load the demo MoE");
        let tok = Arc::new(lm.tokenizer.take().expect("the demo MoE has a tokenizer"));
        let gpu = Arc::new(GpuModel::upload(ctx, &lm.model, |_, _| {}).expect("upload the demo MoE"));
        Some(Demo { gpu, tok })
    });
    let demo = demo.as_ref()?;
    Some((guard, demo))
}

fn config(max_batch: usize, max_queue: usize) -> ServerConfig {
    ServerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        model_id: "demo".into(),
        scheduler: SchedulerConfig { max_batch, max_queue },
        ..ServerConfig::default()
    }
}

fn start(demo: &Demo, config: ServerConfig) -> Server {
    Server::start(config, demo.gpu.clone(), demo.tok.clone(), Some(demo.gpu.subscribe())).expect("start the server")
}

fn post(addr: SocketAddr, path: &str, body: &[u8]) -> HttpResponse {
    request(addr, "POST", path, Some(body), IO_TIMEOUT).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    request(addr, "GET", path, None, IO_TIMEOUT).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The value of an unlabelled or labelled sample in Prometheus text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
}

/// Waits (bounded) until `cond` holds for the server's stats.
fn chat_body(prompt: &str, max_tokens: usize, stream: bool) -> String {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// What one streamed chat response said.
#[derive(Debug, Default)]
struct Streamed {
    status: u16,
    text: String,
    finish: Option<String>,
    completion_tokens: Option<u64>,
    ids: Vec<String>,
    /// The `object` and the chat `delta.role` of each chunk.
    objects: Vec<String>,
    roles: Vec<Option<String>>,
    done: bool,
    error: Option<Value>,
}

fn read_stream(mut s: SseStream) -> Streamed {
    let mut out = Streamed {
        status: s.status,
        ..Default::default()
    };
    if s.status != 200 {
        out.error = serde_json::from_str(&s.rest().unwrap_or_default()).ok();
        return out;
    }
    while let Some(ev) = s.next_event().expect("read the stream") {
        assert!(!out.done, "data after [DONE]: {ev:?}");
        if ev.data == "[DONE]" {
            out.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&ev.data).unwrap_or_else(|e| panic!("chunk {:?}: {e}", ev.data));
        if v.get("error").is_some() {
            out.error = Some(v);
            continue;
        }
        out.ids.push(v["id"].as_str().unwrap_or_default().to_string());
        out.objects.push(v["object"].as_str().unwrap_or_default().to_string());
        out.roles.push(
            v.pointer("/choices/0/delta/role")
                .and_then(Value::as_str)
                .map(String::from),
        );
        if let Some(t) = v.pointer("/choices/0/delta/content").and_then(Value::as_str) {
            out.text.push_str(t);
        }
        if let Some(t) = v.pointer("/choices/0/text").and_then(Value::as_str) {
            out.text.push_str(t);
        }
        if let Some(f) = v.pointer("/choices/0/finish_reason").and_then(Value::as_str) {
            assert!(out.finish.is_none(), "two finish reasons");
            out.finish = Some(f.to_string());
        }
        if let Some(n) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
            out.completion_tokens = Some(n);
        }
    }
    out
}

fn open_stream(addr: SocketAddr, path: &str, body: &str) -> SseStream {
    SseStream::open(addr, "POST", path, Some(body.as_bytes()), IO_TIMEOUT).expect("open the stream")
}

fn openai_finish(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Reads events until the first content; the stream is left open.
fn read_until_content(s: &mut SseStream) {
    loop {
        let ev = s.next_event().expect("read").expect("stream ended before any content");
        let v: Value = serde_json::from_str(&ev.data).expect("a JSON chunk");
        if v.pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty())
        {
            return;
        }
    }
}

#[test]
fn sixty_four_concurrent_streams_match_their_single_request_greedy_output() {
    let Some((_gpu, demo)) = demo() else { return };
    let tok = &demo.tok;
    const N: usize = 64;
    const MAX_TOKENS: usize = 8;
    // 8 distinct prompts, 8 requests each: a mix-up between sequences of
    // the batch would hand some request another prompt's text. Short
    // completion prompts keep the prefill (slow on lavapipe) small.
    let distinct = &load::PROMPTS[..8];
    let prompts: Vec<&str> = (0..N).map(|i| distinct[i % distinct.len()]).collect();
    let opts = GenerateOptions {
        max_new_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let t_ref = Instant::now();
    let reference: Vec<(String, &str, usize)> = distinct
        .iter()
        .map(|p| {
            let ids = tok.encode(p, true).unwrap();
            let g = generate(&*demo.gpu, tok, &ids, &opts, |_| {}).unwrap();
            (g.text, openai_finish(g.finish), g.tokens.len())
        })
        .collect();
    eprintln!(
        "{} single-request references took {:.1}s",
        distinct.len(),
        t_ref.elapsed().as_secs_f64()
    );

    let server = start(demo, config(N, N));
    let addr = server.addr();
    let steps = demo.gpu.subscribe();
    let barrier = Barrier::new(N);
    let t0 = Instant::now();
    let results: Vec<Streamed> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let barrier = &barrier;
                s.spawn(move || {
                    let body = json!({"model": "demo", "prompt": p, "max_tokens": MAX_TOKENS, "stream": true,
                                      "stream_options": {"include_usage": true}})
                    .to_string();
                    barrier.wait();
                    read_stream(open_stream(addr, "/v1/completions", &body))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    eprintln!("{N} concurrent streams took {:.1}s", t0.elapsed().as_secs_f64());

    let mut ids = std::collections::HashSet::new();
    for (i, r) in results.iter().enumerate() {
        let (text, finish, tokens) = &reference[i % distinct.len()];
        assert_eq!(r.status, 200, "request {i}: {:?}", r.error);
        assert!(r.error.is_none(), "request {i}: {:?}", r.error);
        assert!(r.done, "request {i}: no [DONE]");
        assert_eq!(&r.text, text, "request {i} ({:?}): streamed text vs alone", prompts[i]);
        assert_eq!(r.finish.as_deref(), Some(*finish), "request {i}: finish reason");
        assert_eq!(r.completion_tokens, Some(*tokens as u64), "request {i}: usage");
        // One id per response, on every chunk, and no two responses share it.
        assert!(r.ids.iter().all(|id| *id == r.ids[0]), "request {i}: ids {:?}", r.ids);
        assert!(ids.insert(r.ids[0].clone()), "request {i}: id {} reused", r.ids[0]);
    }
    let st = server.stats();
    assert_eq!(
        (st.completed, st.cancelled, st.failed, st.running, st.queued),
        (N as u64, 0, 0, 0, 0),
        "{st:?}"
    );
    // The requests really shared the loop: some decode step ran most of them.
    let steps: Vec<_> = steps.try_iter().collect();
    for decode in [false, true] {
        let v: Vec<_> = steps.iter().filter(|m| m.decode == decode).collect();
        eprintln!(
            "{} steps: {}, {} tokens, {:.1}s",
            if decode { "decode" } else { "prefill" },
            v.len(),
            v.iter().map(|m| m.tokens).sum::<usize>(),
            v.iter().map(|m| m.seconds).sum::<f64>()
        );
    }
    let widest = steps.iter().filter(|m| m.decode).map(|m| m.tokens).max().unwrap_or(0);
    assert!(widest >= N / 2, "the widest decode step had {widest} sequences");
    server.shutdown();
}

#[test]
fn client_disconnect_frees_its_slot_and_a_full_queue_answers_429() {
    let Some((_gpu, demo)) = demo() else { return };
    let server = start(demo, config(1, 1));
    let addr = server.addr();
    let long = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": 2000, "stream": true, "ignore_eos": true})
    .to_string();
    let short = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                       "stream": true, "ignore_eos": true, "stream_options": {"include_usage": true}})
    .to_string();

    // A holds the only slot and is streaming; B waits in the only queue place.
    let mut a = open_stream(addr, "/v1/chat/completions", &long);
    assert_eq!(a.status, 200);
    read_until_content(&mut a);
    let b = open_stream(addr, "/v1/chat/completions", &short);
    wait_for(&server, "B to queue", |s| s.queued == 1 && s.running == 1);

    // C finds the queue full.
    let c = post(addr, "/v1/chat/completions", chat_body("Hello", 4, false).as_bytes());
    assert_eq!(c.status, 429, "{}", c.text());
    assert_eq!(c.header("retry-after"), Some("1"));
    let err = c.json().unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_error", "{err}");
    assert_eq!(err["error"]["code"], "queue_full", "{err}");

    // A's client goes away mid-stream: its slot goes to B, which finishes.
    let tokens_at_drop = server.stats().generated_tokens;
    drop(a);
    let b = read_stream(b);
    assert!(b.done && b.error.is_none(), "{b:?}");
    assert_eq!(b.completion_tokens, Some(3));
    wait_for(&server, "A's cancellation", |s| {
        s.cancelled == 1 && s.running == 0 && s.queued == 0
    });
    let st = server.stats();
    assert_eq!(st.completed, 1, "{st:?}");
    // A ran at most a few steps after its client left, not to its limit;
    // B's 3 tokens are in the count too.
    let after = st.generated_tokens - tokens_at_drop;
    assert!(
        after <= 3 + 8,
        "A kept decoding after its client left: {after} more tokens ({st:?})"
    );

    let m = get(addr, "/metrics").text();
    assert_eq!(sample(&m, "lynx_running_batch_size"), Some(0.0), "{m}");
    assert_eq!(sample(&m, "lynx_queue_depth"), Some(0.0), "{m}");
    assert_eq!(
        sample(&m, "lynx_requests_total{outcome=\"cancelled\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "lynx_requests_rejected_total{reason=\"queue_full\"}"),
        Some(1.0),
        "{m}"
    );

    // A non-streaming client that leaves while its request waits in the
    // queue is let go too; its response would only start at the end, so
    // it is sent by hand.
    let mut a = open_stream(addr, "/v1/chat/completions", &long);
    read_until_content(&mut a);
    let body = chat_body("Hello", 4, false);
    let mut waiting = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    waiting.write_all(format!("{head}{body}").as_bytes()).unwrap();
    wait_for(&server, "the non-streaming request to queue", |s| s.queued == 1);
    drop(waiting);
    wait_for(&server, "the queued request's cancellation", |s| {
        s.cancelled == 2 && s.queued == 0
    });
    assert_eq!(server.stats().running, 1, "A is still running");
    drop(a);
    wait_for(&server, "A's second cancellation", |s| {
        s.cancelled == 3 && s.running == 0
    });
    server.shutdown();
}

#[test]
fn a_request_past_its_timeout_ends_with_an_error_and_frees_its_slot() {
    let Some((_gpu, demo)) = demo() else { return };
    let server = start(
        demo,
        ServerConfig {
            request_timeout: Duration::from_millis(1500),
            ..config(4, 4)
        },
    );
    let addr = server.addr();
    let long = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Count to a thousand."}],
               "max_tokens": 4000, "stream": stream, "ignore_eos": true})
        .to_string()
    };
    let t0 = Instant::now();
    let s = read_stream(open_stream(addr, "/v1/chat/completions", &long(true)));
    assert!(!s.done, "a timed-out stream must not end with [DONE]");
    let e = s.error.expect("an error event");
    assert_eq!(e["error"]["code"], "timeout", "{e}");
    let r = post(addr, "/v1/chat/completions", long(false).as_bytes());
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "timeout");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    wait_for(&server, "the slots to free", |s| s.cancelled == 2 && s.running == 0);
    assert!(server.stats().generated_tokens < 8000);
    assert_eq!(
        sample(&get(addr, "/metrics").text(), "lynx_requests_timed_out_total"),
        Some(2.0)
    );
    server.shutdown();
}

#[test]
fn every_endpoint_answers_in_openai_shape() {
    let Some((_gpu, demo)) = demo() else { return };
    let tok = &demo.tok;
    let server = start(demo, config(8, 16));
    let addr = server.addr();

    let h = get(addr, "/health");
    assert_eq!((h.status, h.json().unwrap()["status"].clone()), (200, json!("ok")));
    let m = get(addr, "/v1/models").json().unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "demo");
    assert_eq!(get(addr, "/v1/models/demo").status, 200);
    assert_eq!(
        get(addr, "/v1/models/gpt-4").json().unwrap()["error"]["code"],
        "model_not_found"
    );

    // A viewer attached to the expert stream sees the steps of a request.
    let mut viewer = SseStream::open(addr, "GET", "/v1/experts/stream", None, IO_TIMEOUT).unwrap();
    assert_eq!(viewer.status, 200);
    let cors = viewer.headers.iter().find(|(k, _)| k == "access-control-allow-origin");
    assert_eq!(cors.map(|(_, v)| v.as_str()), Some("*"));

    // Non-streaming chat: the text of a single greedy run, with usage.
    let prompt = "What is the capital of France?";
    let ids = tok.encode_chat(&[ChatMessage::user(prompt)]).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        ..GenerateOptions::default()
    };
    let alone = generate(&*demo.gpu, tok, &ids, &opts, |_| {}).unwrap();
    let r = post(addr, "/v1/chat/completions", chat_body(prompt, 6, false).as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json().unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "demo");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], alone.text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], openai_finish(alone.finish));
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], alone.tokens.len());
    assert_eq!(v["usage"]["total_tokens"], ids.len() + alone.tokens.len());

    // Streamed chat: a role chunk, content chunks, a finish chunk, usage.
    let s = read_stream(open_stream(addr, "/v1/chat/completions", &chat_body(prompt, 6, true)));
    assert!(s.done && s.error.is_none(), "{s:?}");
    assert_eq!(s.text, alone.text);
    assert_eq!(s.finish.as_deref(), Some(openai_finish(alone.finish)));
    assert_eq!(s.completion_tokens, Some(alone.tokens.len() as u64));
    assert_eq!(s.roles[0].as_deref(), Some("assistant"), "{s:?}");
    assert!(s.roles[1..].iter().all(Option::is_none), "{s:?}");
    assert!(s.objects.iter().all(|o| o == "chat.completion.chunk"), "{s:?}");

    let step = loop {
        let ev = viewer.next_event().unwrap().expect("the expert stream ended");
        let m: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(ev.event, "step");
        if m["decode"] == true {
            break m;
        }
    };
    assert_eq!(step["policy"], "exact");
    assert!(step["layers"].as_array().is_some_and(|l| !l.is_empty()), "{step}");
    drop(viewer);

    // Completions, both ways, against a single run of the raw prompt.
    let text = "The capital of France is";
    let ids = tok.encode(text, true).unwrap();
    let alone = generate(&*demo.gpu, tok, &ids, &opts, |_| {}).unwrap();
    let body = |stream: bool| json!({"model": "demo", "prompt": text, "max_tokens": 6, "stream": stream}).to_string();
    let v = post(addr, "/v1/completions", body(false).as_bytes()).json().unwrap();
    assert_eq!(v["object"], "text_completion", "{v}");
    assert_eq!(v["choices"][0]["text"], alone.text.as_str());
    let s = read_stream(open_stream(addr, "/v1/completions", &body(true)));
    assert!(s.done, "{s:?}");
    assert_eq!(s.text, alone.text);
    // Token ids work as a prompt too.
    let v = post(
        addr,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 6}).to_string().as_bytes(),
    );
    assert_eq!(v.json().unwrap()["choices"][0]["text"], alone.text.as_str());

    // A stop string ends the reply before it.
    let words: Vec<&str> = alone.text.split_whitespace().collect();
    if words.len() >= 2 {
        let stop = words[1];
        let v = post(
            addr,
            "/v1/completions",
            json!({"prompt": text, "max_tokens": 6, "stop": stop})
                .to_string()
                .as_bytes(),
        )
        .json()
        .unwrap();
        let got = v["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(
            !got.contains(stop) && alone.text.starts_with(&got),
            "{got:?} vs {:?}",
            alone.text
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    let m = get(addr, "/metrics");
    assert!(m.header("content-type").is_some_and(|c| c.starts_with("text/plain")));
    let m = m.text();
    for family in [
        "lynx_queue_depth",
        "lynx_running_batch_size",
        "lynx_tokens_per_second",
        "lynx_layer_distinct_experts",
    ] {
        assert!(m.contains(&format!("# TYPE {family} gauge")), "{family} missing:\n{m}");
    }
    assert!(sample(&m, "lynx_tokens_per_second").is_some_and(|t| t > 0.0), "{m}");
    assert!(
        sample(&m, "lynx_requests_total{outcome=\"completed\"}").is_some_and(|n| n >= 5.0),
        "{m}"
    );
    // The demo MoE's layers are all MoE; under exact routing the selected
    // experts are the exact ones.
    let e0 = sample(&m, "lynx_layer_distinct_experts{layer=\"0\",routing=\"exact\"}").expect("layer 0 gauge");
    let s0 = sample(&m, "lynx_layer_distinct_experts{layer=\"0\",routing=\"selected\"}").expect("layer 0 gauge");
    assert!(e0 >= 1.0 && e0 == s0, "{m}");
    server.shutdown();
}

#[test]
fn the_load_generator_times_every_request_under_both_policies() {
    let Some((_gpu, demo)) = demo() else { return };
    for policy in [ExpertPolicy::Exact, ExpertPolicy::Lynx(None)] {
        let server = start(demo, ServerConfig { policy, ..config(8, 8) });
        let spec = load::LoadSpec {
            clients: 4,
            requests_per_client: 2,
            max_tokens: 4,
            timeout: IO_TIMEOUT,
        };
        let r = load::run(server.addr(), &spec);
        assert!(r.errors.is_empty(), "{policy}: {:?}", r.errors);
        assert_eq!(r.samples.len(), 8);
        assert!(
            r.samples
                .iter()
                .all(|s| s.tokens == 4 && s.latency_s >= s.first_token_s && s.first_token_s > 0.0)
        );
        assert!(r.requests_per_s() > 0.0 && r.latency_quantile(0.99) >= r.latency_quantile(0.5));
        let m = get(server.addr(), "/metrics").text();
        assert!(m.contains(&format!("policy=\"{policy}\"")), "{m}");
        // Selection never loads more experts than exact routing would.
        for l in 0..demo.gpu.config.num_layers {
            let e = sample(
                &m,
                &format!("lynx_layer_distinct_experts{{layer=\"{l}\",routing=\"exact\"}}"),
            );
            let s = sample(
                &m,
                &format!("lynx_layer_distinct_experts{{layer=\"{l}\",routing=\"selected\"}}"),
            );
            assert!(s.unwrap() <= e.unwrap(), "layer {l}: {m}");
        }
        server.shutdown();
    }
}

/// Bad input over HTTP, on the CPU engine (no GPU needed): every case gets
/// its 4xx with an OpenAI error body, and the server keeps serving.
#[test]
fn bad_input_gets_a_4xx_with_an_openai_error_body() {
    let mut lm = lynx::load(&lynx::loader::demo_moe_gguf_path()).unwrap();
    let tok = Arc::new(lm.tokenizer.take().unwrap());
    let engine = Arc::new(lm.model);
    let cfg = ServerConfig {
        max_body_bytes: 64 << 10,
        max_prompt_tokens: 256,
        max_tokens: 512,
        ..config(2, 2)
    };
    let server = Server::start(cfg, engine, tok, None).unwrap();
    let addr = server.addr();
    let chat = "/v1/chat/completions";
    let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let huge = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(100 << 10)
    );
    let long_prompt = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "hello ".repeat(400)
    );
    // (path, body, status, param, code)
    type Case<'a> = (&'a str, Vec<u8>, u16, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (chat, b"{\"messages\": [".to_vec(), 400, None, Some("invalid_json")),
        (chat, b"not json at all".to_vec(), 400, None, Some("invalid_json")),
        (chat, b"".to_vec(), 400, None, Some("invalid_json")),
        (chat, deep.into_bytes(), 400, None, Some("invalid_json")),
        (chat, b"[]".to_vec(), 400, None, Some("invalid_json")),
        (
            chat,
            b"{\"messages\":\"\xff\xfe\"}".to_vec(),
            400,
            None,
            Some("invalid_utf8"),
        ),
        (chat, br#"{"messages":"hi"}"#.to_vec(), 400, Some("messages"), None),
        (chat, br#"{"messages":[]}"#.to_vec(), 400, Some("messages"), None),
        (
            chat,
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"8"}"#.to_vec(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat,
            format!("{{{msg},\"max_tokens\":-5}}").into_bytes(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat,
            format!("{{{msg},\"max_tokens\":0}}").into_bytes(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat,
            format!("{{{msg},\"max_tokens\":1000000000000}}").into_bytes(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat,
            format!("{{{msg},\"max_tokens\":1e400}}").into_bytes(),
            400,
            None,
            Some("invalid_json"),
        ),
        (
            chat,
            format!("{{{msg},\"temperature\":[]}}").into_bytes(),
            400,
            Some("temperature"),
            None,
        ),
        (
            chat,
            format!("{{{msg},\"model\":\"gpt-4\"}}").into_bytes(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            chat,
            br#"{"messages":[{"role":"user","content":null}]}"#.to_vec(),
            400,
            Some("messages[0].content"),
            None,
        ),
        (
            chat,
            long_prompt.into_bytes(),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (chat, huge.into_bytes(), 413, None, Some("request_too_large")),
        (
            "/v1/completions",
            br#"{"prompt":5}"#.to_vec(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            br#"{"prompt":[1,2,99999999]}"#.to_vec(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            br#"{"prompt":"x","n":3}"#.to_vec(),
            400,
            Some("n"),
            Some("unsupported_parameter"),
        ),
        ("/v1/nothing", b"{}".to_vec(), 404, None, Some("not_found")),
    ];
    for (path, body, status, param, code) in &cases {
        let r = post(addr, path, body);
        let what = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        assert_eq!(r.status, *status, "{path} {what}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        let e = r.json().unwrap_or_else(|e| panic!("{what}: {e}"));
        let err = &e["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {e}");
        assert!(
            err["type"].is_string() && err.get("param").is_some() && err.get("code").is_some(),
            "{what}: {e}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], *p, "{what}: {e}");
        }
        if let Some(c) = code {
            assert_eq!(err["code"], *c, "{what}: {e}");
        }
    }
    let r = get(addr, chat);
    assert_eq!(
        (r.status, r.json().unwrap()["error"]["code"].clone()),
        (405, json!("method_not_allowed"))
    );
    // The CPU engine has no expert metrics to stream.
    assert_eq!(get(addr, "/v1/experts/stream").status, 404);

    // Fuzzed bodies the parser refuses get the same status over HTTP.
    let rules = RequestRules {
        model_id: "demo".into(),
        max_tokens: 512,
    };
    let mut rng = Rng(7);
    let mut sent = 0;
    while sent < 100 {
        let body = fuzz_body(&mut rng);
        if let Err(e) = parse_chat_request(&body, &rules) {
            let r = post(addr, chat, &body);
            assert_eq!(
                r.status,
                e.status.as_u16(),
                "{:?}: {}",
                String::from_utf8_lossy(&body),
                r.text()
            );
            sent += 1;
        }
    }

    // The server is still healthy and serves a good request.
    assert_eq!(get(addr, "/health").status, 200);
    let r = post(addr, chat, format!("{{{msg},\"max_tokens\":1}}").as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["usage"]["completion_tokens"], 1);
    let m = get(addr, "/metrics").text();
    // Every refusal of a known endpoint is counted (the unknown path is not).
    let refusals = cases.iter().filter(|c| c.0 != "/v1/nothing").count() + sent;
    assert_eq!(
        sample(&m, "lynx_requests_rejected_total{reason=\"invalid\"}"),
        Some(refusals as f64),
        "{m}"
    );
    assert_eq!(sample(&m, "lynx_requests_total{outcome=\"failed\"}"), Some(0.0), "{m}");
    server.shutdown();
}

/// xorshift64*: a tiny seeded generator, so the fuzz cases are the same on
/// every run and a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// A random JSON value of any type, nested up to `depth`.
fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(*rng.pick(&[0i64, 1, -1, 2, 8, 4096, 4097, i64::MAX, i64::MIN])),
        3 => json!(*rng.pick(&[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.0, 1e300, -1e-300])),
        4 => json!(*rng.pick(&[
            "",
            "a",
            "user",
            "demo",
            "text",
            "\u{0}",
            "☃",
            "<|im_start|>",
            "\u{10ffff}"
        ])),
        5 => json!(u64::MAX),
        6 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth - 1)).collect()),
        _ => {
            let keys = ["role", "content", "type", "text", "include_usage", "x"];
            Value::Object(
                (0..rng.below(4))
                    .map(|_| (rng.pick(&keys).to_string(), random_value(rng, depth - 1)))
                    .collect(),
            )
        }
    }
}

/// A request body: a plausible request with random fields and values, then
/// sometimes damaged at the byte level.
fn fuzz_body(rng: &mut Rng) -> Vec<u8> {
    const FIELDS: [&str; 22] = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "echo",
        "best_of",
        "suffix",
        "ignore_eos",
        "presence_penalty",
        "tools",
        "response_format",
        "user",
    ];
    let mut obj = serde_json::Map::new();
    if rng.below(4) != 0 {
        let n = rng.below(4).max(rng.below(3));
        let messages: Vec<Value> = (0..n)
            .map(|_| {
                if rng.below(12) == 0 {
                    random_value(rng, 2)
                } else {
                    let role = if rng.below(8) == 0 {
                        *rng.pick(&["tool", "", "robot"])
                    } else {
                        *rng.pick(&["user", "system", "assistant", "developer"])
                    };
                    json!({"role": role, "content": if rng.below(8) == 0 { random_value(rng, 2) } else { json!("hi") }})
                }
            })
            .collect();
        obj.insert("messages".into(), Value::Array(messages));
    }
    if rng.below(2) == 0 {
        obj.insert("prompt".into(), json!("Once upon a time"));
    }
    for _ in 0..rng.below(6) {
        let field = rng.pick(&FIELDS).to_string();
        // Mostly a value the field accepts (or nearly: the ranges reach
        // past the limits), sometimes anything at all.
        let v = if rng.below(4) == 0 {
            random_value(rng, 3)
        } else {
            match field.as_str() {
                "model" => json!(*rng.pick(&["demo", "demo", "other"])),
                "prompt" => rng.pick(&[json!("x"), json!([1, 2, 3]), json!(["once"])]).clone(),
                "max_tokens" | "max_completion_tokens" => json!(rng.below(600) as i64 - 10),
                "temperature" => json!(rng.below(26) as f64 / 10.0),
                "top_p" => json!(rng.below(11) as f64 / 10.0),
                "top_k" => json!(rng.below(50) as i64 - 1),
                "seed" => json!(rng.next() as i64),
                "stop" => rng
                    .pick(&[json!("\n"), json!(["a", "b"]), json!([]), json!(["", "a"])])
                    .clone(),
                "stream" | "ignore_eos" | "logprobs" | "echo" => json!(rng.below(4) == 0),
                "stream_options" => json!({"include_usage": rng.below(2) == 0}),
                "n" | "best_of" => json!(rng.below(3)),
                "presence_penalty" => json!(*rng.pick(&[0.0, 0.0, 0.5])),
                "tools" => json!([]),
                "response_format" => json!({"type": *rng.pick(&["text", "json_object"])}),
                _ => json!("u"),
            }
        };
        obj.insert(field, v);
    }
    let mut bytes = if rng.below(10) == 0 {
        random_value(rng, 4)
    } else {
        Value::Object(obj)
    }
    .to_string()
    .into_bytes();
    match rng.below(12) {
        // Flip, delete, insert bytes, or cut the body short.
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !bytes.is_empty() {
                    let i = rng.below(bytes.len());
                    bytes[i] = *rng.pick(&[b'{', b'}', b'"', b',', b':', b'[', 0xff, 0xc3, b'\\', b'0', b' ']);
                }
            }
        }
        1 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            let n = rng.below(bytes.len() - i + 1);
            bytes.drain(i..i + n);
        }
        2 => {
            let i = rng.below(bytes.len() + 1);
            let junks: [&[u8]; 6] = [b"\xf0\x28\x8c\x28", b"null", b",,", b"\"", b"1e999", b"{\"a\":"];
            let junk = *rng.pick(&junks);
            bytes.splice(i..i, junk.iter().copied());
        }
        3 => bytes.truncate(rng.below(bytes.len() + 1)),
        _ => {}
    }
    bytes
}

/// The parser is total: any bytes give a valid request or a 4xx, never a
/// panic, and what it accepts obeys every limit.
#[test]
fn fuzzed_request_bodies_give_a_valid_request_or_a_4xx() {
    let rules = RequestRules {
        model_id: "demo".into(),
        max_tokens: 512,
    };
    let mut rng = Rng(0x5eed_1234);
    let (mut ok, mut refused) = (0usize, 0usize);
    let mut statuses = std::collections::BTreeMap::new();
    for case in 0..20_000 {
        let body = fuzz_body(&mut rng);
        let show = || String::from_utf8_lossy(&body).into_owned();
        let params = match parse_chat_request(&body, &rules) {
            Ok(r) => {
                assert!(!r.messages.is_empty(), "case {case}: {}", show());
                for m in &r.messages {
                    assert!(
                        ["system", "user", "assistant"].contains(&m.role.as_str()),
                        "case {case}: {}",
                        show()
                    );
                }
                Some(r.params)
            }
            Err(e) => {
                refused += 1;
                assert!(e.status.is_client_error(), "case {case}: {e} for {}", show());
                assert!(!e.message.is_empty());
                *statuses.entry(e.status.as_u16()).or_insert(0) += 1;
                None
            }
        };
        let params = params
            .into_iter()
            .chain(parse_completion_request(&body, &rules).map(|r| r.params).map_err(|e| {
                assert!(e.status.is_client_error(), "case {case}: {e} for {}", show());
            }));
        for p in params {
            ok += 1;
            assert!(
                p.max_tokens.is_none_or(|n| (1..=512).contains(&n)),
                "case {case}: {p:?}"
            );
            assert!(
                (0.0..=2.0).contains(&p.temperature) && p.top_p > 0.0 && p.top_p <= 1.0,
                "case {case}: {p:?}"
            );
            assert!(
                p.stop.len() <= 4 && p.stop.iter().all(|s| !s.is_empty()),
                "case {case}: {p:?}"
            );
            let opts = p.options(16);
            opts.sampling.validate().unwrap_or_else(|e| panic!("case {case}: {e}"));
        }
    }
    eprintln!("fuzz: {ok} accepted, statuses of the refusals: {statuses:?}");
    // The generator reaches both sides of the parser, and several kinds of
    // refusal.
    assert!(ok > 2000 && refused > 2000, "{ok} accepted, {refused} refused");
    assert!(
        statuses.contains_key(&400) && statuses.contains_key(&404),
        "{statuses:?}"
    );
}
