//! The browser's loading path, run natively: the demo MoE's GGUF arrives in
//! chunks of awkward sizes through `GgufStreamLoad` (header buffered until
//! it parses, weights written to GPU buffers as they stream) and must give
//! bit-identical logits to the memory-mapped upload, with the same
//! tokenizer; a stream that ends early is a clear error.
//!
//! Needs a GPU adapter (CI installs lavapipe); LYNX_SKIP_GPU_TESTS=1 skips.

use lynx::gpu::{GgufStreamLoad, GpuModel};
use lynx::loader::demo_moe_gguf_path;
use lynx::{Logits, Tokenizer};

/// Feeds `bytes[from..to]` in chunks cycling through `sizes`.
fn stream(load: &mut GgufStreamLoad, bytes: &[u8], from: usize, to: usize, sizes: &[usize]) {
    let mut at = from;
    let mut i = 0;
    while at < to {
        let n = sizes[i % sizes.len()].min(to - at);
        load.push(&bytes[at..at + n]).unwrap();
        at += n;
        i += 1;
        assert_eq!(load.received(), at);
    }
}

/// Prefill of two prompts, then two batched decode steps; every logit.
fn run(gpu: &GpuModel, tok: &Tokenizer) -> Vec<Vec<f32>> {
    let prompts = ["The capital of France is", "Once upon a time, in a small village"];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p, false).unwrap()).collect();
    let mut seqs: Vec<_> = ids.iter().map(|_| gpu.new_sequence()).collect();
    let mut out = Vec::new();
    let mut batch: Vec<_> = seqs.iter_mut().zip(&ids).map(|(s, p)| (s, p.as_slice())).collect();
    out.extend(gpu.forward(&mut batch, Logits::Last).unwrap());
    for step in 0..2u32 {
        let toks: Vec<[u32; 1]> = (0..2).map(|i| [100 + step * 7 + i]).collect();
        let mut batch: Vec<_> = seqs.iter_mut().zip(&toks).map(|(s, t)| (s, t.as_slice())).collect();
        out.extend(gpu.forward(&mut batch, Logits::Last).unwrap());
    }
    out
}

#[test]
fn streamed_demo_model_matches_the_mapped_upload_bit_for_bit() {
    let Some(ctx) = lynx_tests::gpu_ctx() else { return };
    let path = demo_moe_gguf_path();
    let loaded = lynx::load(&path).unwrap();
    let tok = loaded.tokenizer.expect("the demo model has a tokenizer");
    let mapped = GpuModel::upload(ctx.clone(), &loaded.model, |_, _| {}).unwrap();
    let want = run(&mapped, &tok);
    let mapped_bytes = mapped.weight_bytes();
    drop(mapped);

    // The test holds the file to cut it into chunks; the loader never does.
    let bytes = std::fs::read(&path).unwrap();
    let mut load = GgufStreamLoad::new(ctx.clone(), "lynx-moe-135m.Q4_0.gguf", bytes.len());
    // Single bytes through the start of the header, then sizes like a
    // network's, none a multiple of 4.
    stream(&mut load, &bytes, 0, 3000, &[1, 2, 5]);
    stream(&mut load, &bytes, 3000, bytes.len(), &[65_537, 16_383, 1_048_579, 7]);
    let (streamed, stok) = load.finish().unwrap();
    let stok = stok.expect("the streamed GGUF has a tokenizer");
    let text = "Streaming weights, byte for byte: ünïcödé too.";
    assert_eq!(stok.encode(text, true).unwrap(), tok.encode(text, true).unwrap());
    assert_eq!(streamed.config, loaded.model.config);
    assert_eq!(streamed.weight_bytes(), mapped_bytes);
    let got = run(&streamed, &tok);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g == w,
            "logits row {i} differ between the streamed and the mapped upload"
        );
    }
}

#[test]
fn a_stream_that_ends_early_is_a_clear_error() {
    let Some(ctx) = lynx_tests::gpu_ctx() else { return };
    let bytes = std::fs::read(demo_moe_gguf_path()).unwrap();
    // Inside the weights.
    let mut load = GgufStreamLoad::new(ctx.clone(), "demo.gguf", bytes.len());
    stream(&mut load, &bytes, 0, bytes.len() - 1000, &[1 << 20]);
    let err = load.finish().unwrap_err().to_string();
    assert!(err.contains("demo.gguf") && err.contains("ended after"), "{err}");
    // Inside the header.
    let mut load = GgufStreamLoad::new(ctx.clone(), "demo.gguf", bytes.len());
    stream(&mut load, &bytes, 0, 5000, &[4096]);
    let err = load.finish().unwrap_err().to_string();
    assert!(err.contains("inside the header"), "{err}");
    // More bytes than announced.
    let mut load = GgufStreamLoad::new(ctx, "demo.gguf", 10);
    let err = load.push(&bytes[..100]).unwrap_err().to_string();
    assert!(err.contains("more than the 10 bytes"), "{err}");
}
