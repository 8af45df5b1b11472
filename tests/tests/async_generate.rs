//! The async generation path (what the browser runs) against the blocking
//! one, on the demo MoE: `generate_batch_async` must produce exactly what
//! `generate_batch` does, on the CPU reference and on the GPU engine, for a
//! batch whose sequences finish at different steps; greedy GPU output must
//! also equal the CPU reference's for these prompts.
//!
//! Needs a GPU adapter (CI installs lavapipe); LYNX_SKIP_GPU_TESTS=1 skips
//! the GPU half.

use lynx::generate::{GenerateOptions, Generation, generate_batch, generate_batch_async};
use lynx::gpu::GpuModel;
use lynx::sampling::SamplingParams;
use lynx::{ChatMessage, Tokenizer};

fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    ["What is the capital of France?", "Name a colour.", "Count to five."]
        .iter()
        .map(|q| tok.encode_chat(&[ChatMessage::user(*q)]).unwrap())
        .collect()
}

fn options(max_new_tokens: usize, temperature: f32) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams {
            temperature,
            seed: 7,
            ..SamplingParams::default()
        },
        // A stop string that some replies reach makes sequences leave the
        // batch at different steps.
        stop: vec![".".into()],
        ..GenerateOptions::default()
    }
}

fn texts(g: &[Generation]) -> Vec<&str> {
    g.iter().map(|g| g.text.as_str()).collect()
}

#[test]
fn async_generation_matches_blocking_generation_on_cpu_and_gpu() {
    let loaded = lynx::load(&lynx::loader::demo_moe_gguf_path()).unwrap();
    let tok = loaded.tokenizer.unwrap();
    let ps = prompts(&tok);
    let mut streamed_sync = vec![String::new(); ps.len()];
    let mut streamed_async = vec![String::new(); ps.len()];
    // The CPU reference is slow, so it runs the greedy case only.
    let greedy = options(8, 0.0);
    let cpu = generate_batch(&loaded.model, &tok, &ps, &greedy, |_, _| {}).unwrap();
    let cpu_async = pollster::block_on(generate_batch_async(&loaded.model, &tok, &ps, &greedy, |_, _| {})).unwrap();
    assert_eq!(cpu, cpu_async, "CPU");
    let Some(ctx) = lynx_tests::gpu_ctx() else { return };
    let gpu = GpuModel::upload(ctx, &loaded.model, |_, _| {}).unwrap();
    for opts in [greedy, options(6, 0.8)] {
        streamed_sync.iter_mut().for_each(String::clear);
        streamed_async.iter_mut().for_each(String::clear);
        let a = generate_batch(&gpu, &tok, &ps, &opts, |i, t| streamed_sync[i].push_str(t)).unwrap();
        let b = pollster::block_on(generate_batch_async(&gpu, &tok, &ps, &opts, |i, t| {
            streamed_async[i].push_str(t)
        }))
        .unwrap();
        assert_eq!(a, b, "GPU, {opts:?}");
        assert_eq!(streamed_sync, streamed_async);
        assert_eq!(texts(&a), streamed_sync.iter().map(String::as_str).collect::<Vec<_>>());
        if opts.sampling.temperature == 0.0 {
            assert_eq!(texts(&a), texts(&cpu), "greedy GPU and CPU replies");
            eprintln!("greedy replies: {:?}", texts(&a));
        }
    }
}
