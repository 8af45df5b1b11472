//! The demo MoE that ships in the repository (`models/lynx-moe-135m/`,
//! a 16-expert top-8 Mixtral made from SmolLM2-135M-Instruct, stored as a
//! Q4_0 GGUF) against transformers.
//!
//! The reference (`models/lynx-moe-135m/golden.json`) was computed by
//! `models/make_gguf_golden.py`: it reads this same GGUF with the `gguf`
//! package, dequantises every tensor to f32 and runs transformers'
//! `MixtralForCausalLM` on those weights. Both sides therefore use identical
//! f32 weights and only the summation order differs, so the logits must
//! agree closely and the expert choices (top-8 of 16 per token and layer)
//! must be the same. No network and no Python are needed.

use std::path::PathBuf;

use lynx::generate::{GenerateOptions, generate};
use lynx::{ChatMessage, LoadedModel, load};
use lynx_tests::{json_ids, read_json, repo_root};
use serde_json::Value;

/// Max |logit error| over the top-20 entries at every position, on logits
/// up to ~20 (measured max 1.2e-4; printed by the test with --nocapture).
const LOGIT_TOL: f32 = 1e-3;

fn model_path() -> PathBuf {
    let path = lynx::loader::demo_moe_gguf_path();
    assert!(
        path.exists(),
        "the demo model is part of the repository, but {} is missing",
        path.display()
    );
    path
}

fn golden() -> Value {
    read_json(&repo_root().join("models/lynx-moe-135m/golden.json"))
}

fn demo() -> LoadedModel {
    load(&model_path()).unwrap_or_else(|e| panic!("loading the demo MoE: {e}"))
}

#[test]
fn demo_model_is_a_16_expert_top8_mixtral_and_the_default() {
    let m = demo();
    let cfg = &m.model.config;
    let moe = cfg.moe.as_ref().expect("the demo model is a mixture of experts");
    assert_eq!((moe.num_experts, moe.top_k, moe.expert_intermediate_size), (16, 8, 96));
    assert!(
        moe.routing.softmax_then_topk && moe.routing.renormalize,
        "Mixtral routing"
    );
    assert_eq!((cfg.num_layers, cfg.hidden_size, cfg.vocab_size), (30, 576, 49152));
    assert!(cfg.tie_word_embeddings);
    if std::env::var_os("LYNX_MODEL").is_none() {
        assert_eq!(lynx::loader::default_model_path().unwrap(), model_path());
    }
}

/// Both sequences prefilled in one batch; the top-20 logits at every
/// position, and the argmax wherever transformers' top-1/top-2 gap is not
/// within the tolerance.
#[test]
fn logits_match_transformers() {
    let m = demo();
    let v = m.model.config.vocab_size;
    let g = golden();
    let seqs = g["sequences"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| json_ids(&s["ids"])).collect();
    let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let out = lynx_tests::prefill_all(&m.model, &prompt_refs);
    let mut worst = 0f32;
    for (i, (got, s)) in out.iter().zip(seqs).enumerate() {
        let n = prompts[i].len();
        assert_eq!(got.len(), n * v);
        let argmax = json_ids(&s["argmax"]);
        for (t, top) in s["top20"].as_array().unwrap().iter().enumerate() {
            let row = &got[t * v..(t + 1) * v];
            for pair in top.as_array().unwrap() {
                let (id, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                let err = (row[id] - want).abs();
                worst = worst.max(err);
                assert!(
                    err <= LOGIT_TOL,
                    "seq {i} pos {t} token {id}: {} vs {want} (|err| {err} > {LOGIT_TOL})",
                    row[id]
                );
            }
            let margin = s["margins"][t].as_f64().unwrap() as f32;
            let ours = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &x)| if x > b.1 { (j, x) } else { b })
                .0;
            if margin > 2.0 * LOGIT_TOL {
                assert_eq!(
                    ours as u32, argmax[t],
                    "seq {i} pos {t}: argmax (transformers' margin {margin})"
                );
            }
        }
    }
    eprintln!(
        "demo MoE: top-20 logits at {} positions, max |err| = {worst:.2e}",
        prompts.iter().map(Vec::len).sum::<usize>()
    );
}

/// The chat template renders the same prompt ids, and greedy decoding
/// (KV cache, one token per step) produces transformers' tokens.
#[test]
fn greedy_chat_matches_transformers() {
    let m = demo();
    let tok = m.tokenizer.as_ref().expect("the GGUF carries a tokenizer");
    for chat in golden()["chats"].as_array().unwrap() {
        let prompt = chat["prompt"].as_str().unwrap();
        let rendered = tok.apply_chat_template(&[ChatMessage::user(prompt)], true).unwrap();
        let prompt_ids = tok.encode(&rendered, true).unwrap();
        assert_eq!(prompt_ids, json_ids(&chat["prompt_ids"]), "{prompt:?}: prompt ids");
        let want = json_ids(&chat["greedy_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..GenerateOptions::default()
        };
        let out = generate(&m.model, tok, &prompt_ids, &opts, |_| {}).unwrap();
        assert_eq!(out.tokens, want, "{prompt:?}: greedy token ids");
        assert_eq!(out.text, chat["greedy_text"].as_str().unwrap(), "{prompt:?}: text");
        eprintln!("{prompt:?} -> {:?}", out.text);
    }
}
