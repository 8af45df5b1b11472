//! The `lynx` binary end to end: `inspect` on every fixture, and bad input
//! that must end in a one-line error and exit code 1, never a panic.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures")
}

fn lynx(args: &[&str]) -> (i32, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_lynx")).args(args))
}

/// Runs the command to completion: exit code, stdout, stderr.
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run lynx");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_describes_every_fixture() {
    for (fixture, arch, experts) in [
        ("llama", "llama", None),
        ("mixtral", "mixtral", Some("E=8 top-k=2")),
        ("olmoe", "olmoe", Some("E=8 top-k=2")),
        ("qwen2_moe", "qwen2_moe", Some("E=8 top-k=2")),
        ("qwen3_moe", "qwen3_moe", Some("E=8 top-k=2")),
        ("qwen3_moe_stacked", "qwen3_moe", Some("E=8 top-k=2")),
    ] {
        let path = fixtures().join(fixture);
        let (code, out, err) = lynx(&["inspect", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{fixture}: {err}");
        assert!(out.contains(&format!("architecture:    {arch}")), "{fixture}: {out}");
        match experts {
            Some(e) => assert!(out.contains(e), "{fixture}: {out}"),
            None => assert!(out.contains("dense"), "{fixture}: {out}"),
        }
        // The parameter count equals the elements actually stored.
        assert!(out.contains("parameters:"), "{fixture}: {out}");
    }
}

#[test]
fn bad_input_exits_with_a_clear_error() {
    let llama = fixtures().join("llama");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inspect", "/no/such/model"], "does not exist"),
        (vec!["generate", "/no/such/model", "--prompt", "hi"], "does not exist"),
        // The tiny fixtures have no tokenizer.
        (
            vec!["generate", llama.to_str().unwrap(), "--prompt", "hi"],
            "has no tokenizer",
        ),
        (
            vec!["generate", llama.to_str().unwrap(), "--prompt", "hi", "--top-p", "0"],
            "top_p",
        ),
        (
            vec![
                "generate",
                llama.to_str().unwrap(),
                "--prompt",
                "hi",
                "--device",
                "cpu",
                "--experts",
                "lynx",
            ],
            "need the GPU engine",
        ),
        (
            vec!["bench", llama.to_str().unwrap(), "--experts", "exact,oea=x"],
            "invalid --experts",
        ),
        (
            vec!["eval", llama.to_str().unwrap(), "--experts", "topk=0"],
            "invalid --experts",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = lynx(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("Error:") && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `lynx quantize` writes a Qwen2-MoE (biases, shared expert) in
/// llama.cpp's `qwen2moe` layout; its 64-value rows cannot hold Q4_K
/// super-blocks, so they fall back to Q5_0 and the command says so; the
/// file loads back. An unknown format is refused with the list.
#[test]
fn quantize_writes_llama_cpp_layouts_and_reports_fallbacks() {
    let dir = std::env::temp_dir().join(format!("lynx-cli-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("qwen2moe.gguf");
    let model = fixtures().join("qwen2_moe");
    let (code, _, err) = lynx(&[
        "quantize",
        model.to_str().unwrap(),
        "--to",
        "q4_k",
        "--embedding",
        "q8_0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("qwen2moe architecture") && err.contains("embedding Q8_0"),
        "{err}"
    );
    assert!(
        err.contains("blk.0.attn_q.weight: Q5_0 (rows of 64 values are not whole Q4_K blocks)"),
        "{err}"
    );
    let (code, inspect, err) = lynx(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(inspect.contains("qwen2_moe") && inspect.contains("Q5_0"), "{inspect}");

    let (code, _, err) = lynx(&[
        "quantize",
        model.to_str().unwrap(),
        "--to",
        "iq4_xs",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown format `iq4_xs`") && err.contains("q4_k"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prompt_over_the_context_length_is_refused() {
    let gguf = lynx::loader::smollm2_gguf_path();
    assert!(
        gguf.exists(),
        "run `bash models/get-smollm2.sh` first ({} missing)",
        gguf.display()
    );
    // SmolLM2's context is 8192 tokens; " a" is one token.
    let prompt = " a".repeat(9000);
    let (code, _, err) = lynx(&["generate", gguf.to_str().unwrap(), "--prompt", &prompt]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("context length is 8192"), "{err}");
}

/// `--experts` and `--trace` on the demo MoE: the trace holds one JSON line
/// per forward step (the prefill, routed exactly, then decode steps under
/// the chosen policy), each with every MoE layer.
#[test]
fn generate_writes_a_trace_of_every_step() {
    let dir = std::env::temp_dir().join(format!("lynx-cli-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    let model = lynx::loader::demo_moe_gguf_path();
    let (code, out, err) = lynx(&[
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--experts",
        "topk=2",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty(), "no text generated: {err}");
    assert!(err.contains("steps written to"), "{err}");
    let text = std::fs::read_to_string(&trace).unwrap();
    let steps: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // Prefill plus a decode step per token after the first; generation may
    // stop early at EOS.
    assert!((1..=3).contains(&steps.len()), "{} steps", steps.len());
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["decode"], i > 0, "step {i}");
        assert_eq!(s["policy"], if i == 0 { "exact" } else { "topk=2" }, "step {i}");
        let layers = s["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 30, "step {i}");
        if i > 0 {
            // One token keeping 2 of its 8 slots loads 2 experts per layer.
            assert!(layers.iter().all(|l| l["distinct_selected"] == 2), "step {i}: {s}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `lynx` where wgpu finds no adapter: the only native backend built in
/// is Vulkan, and the Vulkan loader is pointed at a driver list that does
/// not exist.
fn lynx_without_gpu(args: &[&str]) -> (i32, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_lynx"))
        .args(args)
        .env("WGPU_BACKEND", "vulkan")
        .env("VK_ICD_FILENAMES", "/nonexistent.json")
        .env("VK_DRIVER_FILES", "/nonexistent.json"))
}

#[test]
fn without_a_gpu_adapter_generate_falls_back_to_the_cpu_engine() {
    // The explicit GPU request fails, which also shows that this
    // environment really hides every adapter.
    let (code, _, err) = lynx_without_gpu(&["generate", "--device", "gpu", "--prompt", "hi", "--max-tokens", "2"]);
    assert_eq!(code, 1, "--device gpu without an adapter should fail: {err}");
    assert!(err.contains("--device gpu") && err.contains("no GPU adapter"), "{err}");

    // The default (auto) falls back, says so in one line, and answers
    // exactly as the CPU engine does.
    let args = ["generate", "--prompt", "The capital of France is", "--max-tokens", "4"];
    let (code, out, err) = lynx_without_gpu(&args);
    assert_eq!(code, 0, "{err}");
    let notices: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("no GPU adapter found") && l.contains("running on the CPU engine"))
        .collect();
    assert_eq!(notices.len(), 1, "expected one fallback notice on stderr: {err}");
    assert!(!out.trim().is_empty(), "no text generated: {err}");
    let mut cpu_args = args.to_vec();
    cpu_args.extend(["--device", "cpu"]);
    let (code, cpu_out, cpu_err) = lynx(&cpu_args);
    assert_eq!(code, 0, "{cpu_err}");
    assert_eq!(out, cpu_out, "the fallback should answer as --device cpu does");
}

#[test]
fn without_a_gpu_adapter_gpu_only_features_say_so() {
    for (args, want) in [
        (
            vec!["generate", "--prompt", "hi", "--experts", "lynx"],
            "--experts lynx needs the GPU engine",
        ),
        (
            vec!["serve", "--port", "0", "--experts", "oea"],
            "--experts oea needs the GPU engine",
        ),
        (vec!["eval"], "GPU engine only"),
        (vec!["bench"], "GPU engine only"),
    ] {
        let (code, _, err) = lynx_without_gpu(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
