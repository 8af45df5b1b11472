//! Shared helpers for Lynx's cross-crate tests: fixture paths, golden file
//! reading, and error measures.

use std::path::{Path, PathBuf};

pub mod real_gguf;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures_dir() -> PathBuf {
    repo_root().join("models/fixtures")
}

/// The tiny random-weight checkpoints made by `models/make_fixtures.py`.
pub const FIXTURES: [&str; 6] = [
    "llama",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_moe_stacked",
];

/// One reference sequence: its token ids and transformers' logits, (T, V).
pub struct GoldenSeq {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
}

/// Reads a fixture's `golden.safetensors`.
pub fn read_golden(fixture: &str) -> Vec<GoldenSeq> {
    read_golden_file(&fixtures_dir().join(fixture).join("golden.safetensors"))
}

/// Reads a golden file: `input_ids.{i}` (I32) and `logits.{i}` (F32).
pub fn read_golden_file(path: &Path) -> Vec<GoldenSeq> {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for i in 0.. {
        let Ok(ids) = st.tensor(&format!("input_ids.{i}")) else {
            break;
        };
        let logits = st.tensor(&format!("logits.{i}")).expect("logits beside input_ids");
        out.push(GoldenSeq {
            ids: ids
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect(),
            logits: f32s(logits.data()),
        });
    }
    assert!(!out.is_empty(), "{}: no sequences", path.display());
    out
}

/// Prefills `prompts` together as one batch of fresh sequences on
/// `engine` (the CPU reference or the GPU engine) and returns the logits at
/// every position, one (T, V) row per prompt.
pub fn prefill_all<E: lynx::generate::Engine>(engine: &E, prompts: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut seqs: Vec<_> = prompts.iter().map(|_| engine.new_sequence()).collect();
    let mut batch: Vec<_> = seqs.iter_mut().zip(prompts).map(|(s, p)| (s, *p)).collect();
    forward(engine, &mut batch, lynx::Logits::All).unwrap_or_else(|e| panic!("batched prefill: {e}"))
}

/// One exact-routing forward call on any engine, blocking on it: the
/// tests' shorthand for `Engine::run` with `StepSpec::prefill`.
pub fn forward<E: lynx::generate::Engine>(
    engine: &E,
    batch: &mut [(&mut E::Seq, &[u32])],
    logits: lynx::Logits,
) -> lynx::Result<Vec<Vec<f32>>> {
    pollster::block_on(engine.run(batch, lynx::generate::StepSpec::prefill(logits))).map(|o| o.logits)
}

/// The token ids of each golden sequence.
pub fn golden_ids(golden: &[GoldenSeq]) -> Vec<&[u32]> {
    golden.iter().map(|g| g.ids.as_slice()).collect()
}

/// Polls `server`'s scheduler until `cond` holds, failing the test after
/// two minutes with `what` and the last statistics.
pub fn wait_for(server: &lynx_cli::server::Server, what: &str, cond: impl Fn(&lynx::serving::SchedulerStats) -> bool) {
    let t0 = std::time::Instant::now();
    while !cond(&server.stats()) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "timed out waiting for {what}: {:?}",
            server.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Reads a golden JSON file (a test fixture), naming it on failure.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    let ids = v
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of token ids, found {v}"));
    ids.iter()
        .map(|x| {
            x.as_u64()
                .unwrap_or_else(|| panic!("token id {x} is not a whole number")) as u32
        })
        .collect()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Largest |a - b| and its index.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| ((x - y).abs(), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 || d.0.is_nan() { d } else { m })
}

/// Normalised mean squared error: `sum((a - b)^2) / sum(b^2)`.
pub fn nmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    num / den.max(f64::MIN_POSITIVE)
}

/// A fresh, empty directory under the system temp dir for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lynx-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Copies a fixture directory so a test can damage the copy.
pub fn copy_fixture(fixture: &str, to: &Path) {
    for entry in std::fs::read_dir(fixtures_dir().join(fixture)).expect("fixture dir") {
        let p = entry.expect("dir entry").path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).expect("copy fixture file");
    }
}

/// The GPU context shared by a test binary's GPU tests, or `None` when
/// `LYNX_SKIP_GPU_TESTS=1`. Without an adapter it panics with the fix
/// (install mesa-vulkan-drivers), so a missing driver is never a silent pass.
pub fn gpu_ctx() -> Option<std::sync::Arc<lynx::gpu::GpuContext>> {
    use std::sync::{Arc, OnceLock};
    if std::env::var("LYNX_SKIP_GPU_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("GPU test skipped: LYNX_SKIP_GPU_TESTS=1");
        return None;
    }
    static CTX: OnceLock<Result<Arc<lynx::gpu::GpuContext>, String>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        lynx::gpu::GpuContext::new(lynx::gpu::GpuOptions::from_env())
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    match ctx {
        Ok(c) => Some(c.clone()),
        Err(e) => panic!("{e} (set LYNX_SKIP_GPU_TESTS=1 to skip the GPU tests)"),
    }
}
