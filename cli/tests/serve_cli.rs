//! `lynx serve` end to end on the CPU reference (no GPU needed): it prints
//! its address, answers over HTTP, and refuses bad flags before loading.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lynx_cli::server::http_client::request;

/// Kills the server when the test ends, also through a failed assertion.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_answers_on_the_port_it_prints() {
    let child = Command::new(env!("CARGO_BIN_EXE_lynx"))
        .args([
            "serve",
            "--device",
            "cpu",
            "--port",
            "0",
            "--model-id",
            "demo",
            "--max-tokens",
            "8",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lynx serve");
    let mut child = Killed(child);
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // `[lynx serve: http://127.0.0.1:PORT (...)]`; the server has bound its
    // port by the time it says so.
    let addr: SocketAddr = loop {
        let line = lines.next().expect("lynx serve exited before listening").unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let t = Duration::from_secs(120);
    let r = request(addr, "GET", "/v1/models", None, t).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap()["data"][0]["id"], "demo");
    let body = br#"{"model":"demo","prompt":"The capital of France is","max_tokens":2}"#;
    let r = request(addr, "POST", "/v1/completions", Some(body), t).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["usage"]["completion_tokens"], 2);
    // --max-tokens is the server's limit.
    let body = br#"{"prompt":"x","max_tokens":9}"#;
    assert_eq!(
        request(addr, "POST", "/v1/completions", Some(body), t).unwrap().status,
        400
    );
}

#[test]
fn serve_refuses_bad_flags_with_a_clear_error() {
    for (args, want) in [
        (vec!["serve", "--experts", "bogus"], "expert policy"),
        (vec!["serve", "--device", "cpu", "--experts", "lynx"], "--device gpu"),
        (vec!["serve", "--request-timeout", "0"], "--request-timeout"),
        (
            vec!["serve", "--max-tokens", "4", "--default-max-tokens", "8"],
            "max tokens",
        ),
        (vec!["serve", "--bench", "0"], "--bench"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_lynx"))
            .args(&args)
            .output()
            .expect("run lynx");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("Error:") && err.contains(want), "{args:?}: {err}");
    }
}
