//! The continuous-batching serving loop on the GPU engine with SmolLM2:
//! requests that join a running batch get the same greedy text as alone,
//! each with its own limits; a dropped request frees its slot; a full queue
//! refuses more requests.

use std::sync::Arc;
use std::time::Duration;

use lynx::generate::{GenerateOptions, generate};
use lynx::gpu::GpuModel;
use lynx::serving::{Event, Scheduler, SchedulerConfig, SubmitError};
use lynx_tests::gpu_ctx;

/// Shuts the scheduler down when a test body ends, also through a failed
/// assertion, so that the scoped runner thread returns and the test fails
/// instead of hanging.
struct ShutdownOnDrop<'a>(&'a Scheduler);

impl Drop for ShutdownOnDrop<'_> {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

fn smollm2() -> Option<(lynx::LoadedModel, GpuModel)> {
    let ctx = gpu_ctx()?;
    let path = lynx::loader::smollm2_gguf_path();
    assert!(
        path.exists(),
        "run `bash models/get-smollm2.sh` first ({} missing)",
        path.display()
    );
    let lm = lynx::load(&path).unwrap();
    let gpu = GpuModel::upload(ctx, &lm.model, |_, _| {}).unwrap();
    Some((lm, gpu))
}

#[test]
fn requests_joining_a_running_batch_match_their_single_runs() {
    let Some((lm, gpu)) = smollm2() else { return };
    let tok = lm.tokenizer.as_ref().unwrap();
    let texts = [
        "The capital of France is",
        "def add(a, b):",
        "Water boils at",
        "The first president of the United States was",
    ];
    let limits = [10, 6, 3, 8];
    let sched = Arc::new(
        Scheduler::new(SchedulerConfig {
            max_batch: 3,
            max_queue: 8,
        })
        .unwrap(),
    );
    std::thread::scope(|s| {
        let _stop = ShutdownOnDrop(&sched);
        let runner = sched.clone();
        let gpu_ref = &gpu;
        s.spawn(move || runner.run(gpu_ref, tok));
        let mut handles = Vec::new();
        for (i, (t, n)) in texts.iter().zip(limits).enumerate() {
            let opts = GenerateOptions {
                max_new_tokens: n,
                stop_on_eos: false,
                ..GenerateOptions::default()
            };
            handles.push((
                i,
                opts.clone(),
                sched.submit(tok.encode(t, true).unwrap(), opts).unwrap(),
            ));
            // Let the batch start so later requests join a running one.
            std::thread::sleep(Duration::from_millis(if i == 1 { 300 } else { 0 }));
        }
        for (i, opts, h) in handles {
            let (streamed, done) = h.wait().unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(streamed, done.text, "request {i}: streamed text");
            assert_eq!(done.tokens.len(), limits[i], "request {i}: its own token limit");
            let alone = generate(&gpu, tok, &tok.encode(texts[i], true).unwrap(), &opts, |_| {}).unwrap();
            assert_eq!(done.tokens, alone.tokens, "request {i}: batched vs alone");
        }
        let st = sched.stats();
        assert_eq!(st.completed, 4);
        assert_eq!(st.running, 0);
    });
}

#[test]
fn dropped_request_frees_its_slot_and_full_queue_refuses() {
    let Some((lm, gpu)) = smollm2() else { return };
    let tok = lm.tokenizer.as_ref().unwrap();
    let sched = Arc::new(
        Scheduler::new(SchedulerConfig {
            max_batch: 1,
            max_queue: 1,
        })
        .unwrap(),
    );
    std::thread::scope(|s| {
        let _stop = ShutdownOnDrop(&sched);
        let runner = sched.clone();
        let gpu_ref = &gpu;
        let long = GenerateOptions {
            max_new_tokens: 200,
            stop_on_eos: false,
            ..GenerateOptions::default()
        };
        let prompt = tok.encode("Once upon a time", true).unwrap();
        // Fill the single slot before the loop starts, then the queue.
        let first = sched.submit(prompt.clone(), long.clone()).unwrap();
        s.spawn(move || runner.run(gpu_ref, tok));
        // Wait until the first request is running (its prefill started).
        loop {
            match first.recv_timeout(Duration::from_secs(60)).unwrap() {
                Event::Started { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let second = sched
            .submit(
                prompt.clone(),
                GenerateOptions {
                    max_new_tokens: 2,
                    ..long.clone()
                },
            )
            .unwrap();
        assert!(matches!(
            sched.submit(prompt.clone(), long.clone()),
            Err(SubmitError::QueueFull(1))
        ));
        // The client of the first request goes away mid-stream: the second
        // must then get the slot and finish.
        drop(first);
        let (_, done) = second.wait().unwrap();
        assert_eq!(done.tokens.len(), 2);
        let st = sched.stats();
        assert_eq!(st.cancelled, 1, "{st:?}");
        assert_eq!(st.running, 0, "{st:?}");
        assert!(
            st.generated_tokens < 200,
            "the dropped request must not have run to its limit: {st:?}"
        );
    });
}

/// The browser's loop (`run_async`, awaiting the GPU engine's async forward
/// pass and pausing between iterations) gives the same tokens as blocking
/// generation, and a request queued while others run joins the batch.
#[test]
fn async_loop_matches_blocking_generation() {
    let Some((lm, gpu)) = smollm2() else { return };
    let tok = lm.tokenizer.as_ref().unwrap();
    let texts = ["The capital of France is", "Water boils at", "def add(a, b):"];
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let sched = Scheduler::new(SchedulerConfig {
        max_batch: 4,
        max_queue: 8,
    })
    .unwrap();
    let mut handles: Vec<_> = texts[..2]
        .iter()
        .map(|t| sched.submit(tok.encode(t, true).unwrap(), opts.clone()).unwrap())
        .collect();
    let mut pauses = 0usize;
    pollster::block_on(sched.run_async(&gpu, tok, |busy| {
        pauses += 1;
        // The third request arrives while the first two decode.
        if pauses == 2 {
            handles.push(sched.submit(tok.encode(texts[2], true).unwrap(), opts.clone()).unwrap());
        }
        if !busy || pauses > 100 {
            sched.shutdown();
        }
        std::future::ready(())
    }));
    assert!(pauses <= 100, "the loop did not finish its requests");
    assert_eq!(handles.len(), 3);
    for (i, h) in handles.into_iter().enumerate() {
        let (streamed, done) = h.wait().unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(streamed, done.text, "request {i}: streamed text");
        let alone = generate(&gpu, tok, &tok.encode(texts[i], true).unwrap(), &opts, |_| {}).unwrap();
        assert_eq!(done.tokens, alone.tokens, "request {i}: async loop vs alone");
    }
    assert_eq!(sched.stats().completed, 3);
}
