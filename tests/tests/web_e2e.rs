//! The browser demo end to end, in Debian's headless Chromium: builds the
//! site (`web/build.sh`), serves it on a free loopback port with
//! `lynx_cli::static_site` (what `lynx web` runs), loads the page, which streams
//! the demo model into WebGPU buffers (or, without WebGPU, loads it for the
//! CPU fallback), runs a batched greedy generation there, and checks the
//! replies against the native runtime's for the same prompts: the GPU engine
//! (lavapipe) when the page ran on WebGPU, the CPU reference when it ran on
//! the CPU. A second page, with `navigator.gpu` removed and the model given
//! through the file picker, must fall back to the CPU by itself, say why,
//! and match the CPU reference. Those two runs use the light page
//! (`lite.html`). Last, the viewer page (`index.html`, the desktop app's
//! egui UI) runs its scripted exchange, three tabs decoded as one batch,
//! and its replies are checked against the native engine's (equal, or
//! parting late at a near tie; see below). Screenshots: `target/web-e2e.png`,
//! `target/web-e2e-cpu.png` and `target/web-e2e-viewer.png`; the adapter
//! and decode speeds are printed (run with `--nocapture`).
//!
//! Needs `chromium` (`apt-get install -y chromium`), node with
//! `playwright-core` (`npm ci --prefix web`), the wasm32 target and
//! wasm-bindgen-cli (see `web/build.sh`); `.ci/run` installs them all. It
//! fails, naming the fix, when one is missing, unless LYNX_SKIP_WEB_TESTS=1.

use std::path::{Path, PathBuf};
use std::process::Command;

use lynx::generate::{Engine, GenerateOptions, generate_batch};
use lynx::gpu::GpuModel;
use lynx::sampling::SamplingParams;
use lynx::{ChatMessage, Logits, Tokenizer};
use lynx_tests::repo_root;
use serde_json::Value;

const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Name a colour.",
    "Write one sentence about the sea.",
];
const MAX_NEW_TOKENS: usize = 12;
/// Tokens per reply in the viewer page's scripted exchange.
const VIEWER_TOKENS: usize = 8;

fn chromium() -> PathBuf {
    std::env::var_os("LYNX_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/chromium/chromium"))
}

/// Panics with `fix` when `ok` is false: a missing tool is never a pass.
fn require(ok: bool, what: &str, fix: &str) {
    assert!(
        ok,
        "the browser end-to-end test needs {what}: {fix} (or set LYNX_SKIP_WEB_TESTS=1 to skip it)"
    );
}

fn runs(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success())
}

/// The same prompts the page makes: each a user message in the chat template.
fn prompt_ids(tok: &Tokenizer) -> Vec<Vec<u32>> {
    chat_ids(tok, &PROMPTS)
}

fn chat_ids(tok: &Tokenizer, prompts: &[&str]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|q| tok.encode_chat(&[ChatMessage::user(*q)]).unwrap())
        .collect()
}

/// Greedy replies of `engine` to the prompts, as (text, tokens).
fn reference<E: Engine>(engine: &E, tok: &Tokenizer) -> Vec<(String, Vec<u32>)> {
    greedy(engine, tok, &PROMPTS, MAX_NEW_TOKENS)
}

fn greedy<E: Engine>(engine: &E, tok: &Tokenizer, prompts: &[&str], max_new_tokens: usize) -> Vec<(String, Vec<u32>)> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    generate_batch(engine, tok, &chat_ids(tok, prompts), &opts, |_, _| {})
        .unwrap()
        .into_iter()
        .map(|g| (g.text, g.tokens))
        .collect()
}

/// Why two greedy replies part: the native logits of both candidate tokens
/// where they first differ. Float results differ slightly between GPUs, so
/// a near tie there (a margin of a few hundredths) explains a mismatch that
/// is not a bug; a large margin means the browser computed something else.
fn diagnose<E: Engine>(engine: &E, prompt: &[u32], want: &[u32], got: &[u32]) -> String {
    let k = want.iter().zip(got).take_while(|(a, b)| a == b).count();
    if k >= want.len().min(got.len()) {
        return format!(
            "one reply is a prefix of the other (lengths {} and {})",
            want.len(),
            got.len()
        );
    }
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&want[..k]);
    let mut seq = engine.new_sequence();
    let logits = lynx_tests::forward(engine, &mut [(&mut seq, &ids)], Logits::Last).unwrap();
    let (w, g) = (logits[0][want[k] as usize], logits[0][got[k] as usize]);
    format!(
        "first difference at generated token {k}: native picks {} (logit {w:.4}), the browser {} (native logit {g:.4}); margin {:.4}",
        want[k],
        got[k],
        w - g
    )
}

/// The page's replies from one report.
fn replies(report: &Value) -> Vec<(String, Vec<u32>)> {
    assert!(
        report["error"].is_null(),
        "generation failed in the page: {}",
        report["error"]
    );
    let texts = report["texts"].as_array().unwrap();
    let tokens = report["tokens"].as_array().unwrap();
    texts
        .iter()
        .zip(tokens)
        .map(|(t, ids)| {
            let ids = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            (t.as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// Loads the page at `query` in Chromium (and the model through its file
/// picker when `pick` is given), runs the prompts `runs` times and returns
/// the driver's JSON.
fn browse(
    root: &Path,
    base: &str,
    query: &str,
    runs: usize,
    shot: &Path,
    pick: Option<&Path>,
    hide_webgpu: bool,
) -> Value {
    let web = root.join("web");
    let _ = std::fs::remove_file(shot);
    let request = serde_json::json!({ "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS });
    let mut cmd = Command::new("node");
    cmd.arg(web.join("e2e/e2e.mjs"))
        .arg(format!("{base}{query}"))
        .arg(request.to_string())
        .arg(shot)
        .arg(runs.to_string())
        .env("LYNX_E2E_HIDE_WEBGPU", if hide_webgpu { "1" } else { "0" })
        .current_dir(&web);
    if let Some(file) = pick {
        cmd.arg(file);
    }
    let out = cmd.output().expect("running node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser driver failed:\n{stderr}");
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "driver output is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(
        result["error"].is_null(),
        "the page reported: {}\n{stderr}",
        result["error"]
    );
    assert_eq!(result["reports"].as_array().map(Vec::len), Some(runs), "{stderr}");
    let png = std::fs::read(shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "the screenshot is not a real PNG"
    );
    result
}

/// Checks every report against the native engine's greedy replies.
fn check<E: Engine>(what: &str, result: &Value, engine: &E, tok: &Tokenizer) {
    let want = reference(engine, tok);
    let prompts = prompt_ids(tok);
    for (run, report) in result["reports"].as_array().unwrap().iter().enumerate() {
        let got = replies(report);
        assert_eq!(got.len(), want.len());
        for (i, ((gt, gi), (wt, wi))) in got.iter().zip(&want).enumerate() {
            assert!(
                gi == wi && gt == wt,
                "{what}, run {run}, prompt {i}: the browser replied {gt:?}, the native engine {wt:?}; {}",
                diagnose(engine, &prompts[i], wi, gi)
            );
        }
        assert!(report["decode_tokens"].as_u64().unwrap() > 0);
        eprintln!(
            "{what}, run {run}: prefill {:.0} ms; decode {} tokens at {:.2} tokens/s ({} engine)",
            report["prefill_ms"].as_f64().unwrap(),
            report["decode_tokens"],
            report["decode_tokens_per_s"].as_f64().unwrap(),
            report["engine"].as_str().unwrap()
        );
    }
    eprintln!(
        "{what}: replies match the native engine: {:?}",
        want.iter().map(|w| &w.0).collect::<Vec<_>>()
    );
}

#[test]
fn browser_demo_generates_what_the_native_runtime_does() {
    if std::env::var("LYNX_SKIP_WEB_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("browser test skipped: LYNX_SKIP_WEB_TESTS=1");
        return;
    }
    let root = repo_root();
    let web = root.join("web");
    require(
        chromium().exists(),
        "Chromium",
        "apt-get install -y chromium (or point LYNX_CHROMIUM at a Chromium binary)",
    );
    let node_major = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.trim().trim_start_matches('v').split('.').next()?.parse::<u32>().ok());
    require(
        node_major.is_some_and(|m| m >= 20),
        "node 20 or later (playwright-core needs it)",
        "apt-get install -y nodejs, or a newer node from nodejs.org",
    );
    require(
        web.join("node_modules/playwright-core").is_dir(),
        "playwright-core",
        "npm ci --prefix web",
    );
    require(
        runs("wasm-bindgen", "--version"),
        "wasm-bindgen-cli",
        "cargo install wasm-bindgen-cli --version <the wasm-bindgen version in Cargo.lock>",
    );

    // Build the site (little to do when it is up to date).
    let site = root.join("target/web-site");
    let build = Command::new("bash")
        .arg(web.join("build.sh"))
        .arg(&site)
        .status()
        .expect("running web/build.sh");
    assert!(build.success(), "web/build.sh failed (see its output above)");
    let listener = lynx_cli::static_site::bind(0).unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let served = site.clone();
    std::thread::spawn(move || lynx_cli::static_site::serve(listener, &served));

    let loaded = lynx::load(&lynx::loader::demo_moe_gguf_path()).unwrap();
    let tok = loaded.tokenizer.unwrap();

    // The page as a visitor gets it: WebGPU when the browser offers it.
    // Two runs: the first compiles the pipelines, the second is warm.
    let shot = root.join("target/web-e2e.png");
    let result = browse(&root, &base, "lite.html?autoload", 2, &shot, None, false);
    let backend = &result["backend"];
    eprintln!("browser backend: {backend}");
    eprintln!("browser's own adapter view: {}", result["gpu"]);
    eprintln!("model streamed and loaded in {} s", result["loadSeconds"]);
    if backend["kind"] == "webgpu" {
        assert_eq!(backend["adapter_backend"], "BrowserWebGpu");
        assert_eq!(result["model"]["engine"], "gpu");
        match lynx_tests::gpu_ctx() {
            Some(ctx) => {
                let gpu = GpuModel::upload(ctx, &loaded.model, |_, _| {}).unwrap();
                check("WebGPU page", &result, &gpu, &tok);
            }
            // Native GPU tests switched off: the CPU reference is the oracle
            // (its greedy replies to these prompts equal the GPU engine's).
            None => check("WebGPU page (against the CPU reference)", &result, &loaded.model, &tok),
        }
    } else {
        // No WebGPU here: the page fell back to the CPU on its own.
        assert_eq!(result["model"]["engine"], "cpu");
        check("page without WebGPU (CPU fallback)", &result, &loaded.model, &tok);
    }
    eprintln!("screenshot: {}", shot.display());

    // A browser without WebGPU (navigator.gpu removed before the page runs):
    // the page must say so and fall back to the CPU on its own; checked
    // against the CPU reference. The model comes through the page's file
    // picker this time.
    let shot = root.join("target/web-e2e-cpu.png");
    let model_file = lynx::loader::demo_moe_gguf_path();
    let result = browse(&root, &base, "lite.html", 1, &shot, Some(&model_file), true);
    assert_eq!(result["backend"]["kind"], "cpu");
    let why = result["backend"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("WebGPU is not available in this browser"), "{why}");
    assert_eq!(result["model"]["engine"], "cpu");
    let name = result["modelName"].as_str().unwrap_or_default();
    assert!(name.starts_with("lynx-moe-135m.Q4_0.gguf:"), "the picked file: {name}");
    check("CPU fallback page", &result, &loaded.model, &tok);
    eprintln!("screenshot: {}", shot.display());

    // The viewer page: the desktop app's egui UI on a canvas (WebGL), its
    // scripted exchange (three chat tabs sent together, on exact routing so
    // that the replies can be compared), with the model on WebGPU.
    let shot = root.join("target/web-e2e-viewer.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("{base}index.html?script=chat&max_tokens={VIEWER_TOKENS}&switch=0");
    let out = Command::new("node")
        .arg(web.join("e2e/viewer.mjs"))
        .arg(&url)
        .arg(&shot)
        .current_dir(&web)
        .output()
        .expect("running node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the viewer driver failed:\n{stderr}");
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "viewer driver output is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(
        result["error"].is_null(),
        "the viewer page reported: {}\n{stderr}",
        result["error"]
    );
    let snap = &result["snapshot"];
    let report: Vec<&str> = snap["script_report"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    eprintln!("viewer backend: {}", result["backend"]);
    eprintln!("viewer script ({} s):\n  {}", result["seconds"], report.join("\n  "));
    assert_eq!(snap["script_exit"], 0, "the viewer's script failed: {report:?}");
    assert!(
        snap["max_batch"].as_u64().unwrap() >= 3,
        "the tabs did not decode as one batch: {snap}"
    );
    let got: Vec<&str> = snap["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    let prompts = lynx_viewer::script::CHAT_PROMPTS;
    let native_gpu = (result["backend"]["kind"] == "webgpu")
        .then(lynx_tests::gpu_ctx)
        .flatten()
        .map(|ctx| GpuModel::upload(ctx, &loaded.model, |_, _| {}).unwrap());
    let want = match &native_gpu {
        Some(gpu) => greedy(gpu, &tok, &prompts, VIEWER_TOKENS),
        None => greedy(&loaded.model, &tok, &prompts, VIEWER_TOKENS),
    };
    let ids = chat_ids(&tok, &prompts);
    for (i, (g, (wt, wi))) in got.iter().zip(&want).enumerate() {
        if *g == wt.as_str() {
            continue;
        }
        // SwiftShader has neither shader-f16 nor subgroups, so the browser
        // runs the portable kernels, which round differently from
        // lavapipe's; on this model's flat routers that can flip an expert
        // and move a logit by tenths. A reply may part from the native one
        // only after its first tokens, and only at a near tie of the native
        // logits (measured: 0.30 at token 5 of one reply).
        let gi = tok.encode(g, false).unwrap();
        let why = match &native_gpu {
            Some(gpu) => diagnose(gpu, &ids[i], wi, &gi),
            None => diagnose(&loaded.model, &ids[i], wi, &gi),
        };
        let k = wi.iter().zip(&gi).take_while(|(a, b)| a == b).count();
        let margin: f64 = why
            .rsplit("margin ")
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(f64::INFINITY);
        assert!(
            k >= 3 && margin < 0.5,
            "viewer reply {i}: the browser replied {g:?}, the native engine {wt:?}; {why}"
        );
        eprintln!("viewer reply {i} parts from the native one at a near tie: {why}");
    }
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "the viewer screenshot is not a real PNG"
    );
    eprintln!("viewer replies {got:?}; screenshot: {}", shot.display());

    for f in [
        "index.html",
        "viewer.js",
        "lite.html",
        "lite.js",
        "pkg/lynx_web.js",
        "pkg/lynx_web_bg.wasm",
        "lynx-moe-135m.Q4_0.gguf",
    ] {
        assert!(site.join(f).is_file(), "{f} is missing from the site");
    }
}
