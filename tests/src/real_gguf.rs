//! Checks shared by the tests of real pretrained GGUFs (SmolLM2, Qwen2.5):
//! each file has a golden JSON and last-position logits written by
//! `models/make_real_golden.py`, in which transformers loaded the same GGUF
//! and dequantised it to f32.

use std::path::{Path, PathBuf};

use lynx::generate::{Engine, FinishReason, GenerateOptions, generate};
use lynx::{ChatMessage, LoadedModel, Logits, Tokenizer};
use serde_json::Value;

use crate::{f32s, fixtures_dir, json_ids, max_abs_diff, nmse, read_json};

/// One real GGUF and its golden outputs, named by the fixture prefix
/// (`smollm2`, `qwen25`).
pub struct RealGguf {
    pub name: &'static str,
    pub path: PathBuf,
    pub golden: Value,
}

impl RealGguf {
    /// The GGUF at `path`, which `fetch` (a script under `models/`)
    /// downloads; the golden files are `models/fixtures/{name}_*`.
    pub fn new(name: &'static str, path: PathBuf, fetch: &str) -> RealGguf {
        assert!(
            path.exists(),
            "{name} GGUF not found at {}: run `bash {fetch}`",
            path.display()
        );
        RealGguf {
            name,
            path,
            golden: read_json(&fixtures_dir().join(format!("{name}_golden.json"))),
        }
    }

    pub fn load(&self) -> LoadedModel {
        lynx::load(&self.path).unwrap_or_else(|e| panic!("loading {}: {e}", self.path.display()))
    }

    /// Transformers' logits at the last position of the plain prompt, (V,).
    pub fn last_logits(&self) -> Vec<f32> {
        let path = fixtures_dir().join(format!("{}_logits.safetensors", self.name));
        read_logits(&path)
    }

    /// The tokenizer probes and the rendered chat prompt encode to
    /// transformers' ids, and decode back to its text.
    pub fn check_tokenizer(&self, tok: &Tokenizer) {
        let g = &self.golden;
        for probe in g["tokenizer_probes"].as_array().expect("tokenizer_probes") {
            let text = probe["text"].as_str().unwrap();
            let want = json_ids(&probe["ids"]);
            assert_eq!(
                tok.encode(text, true).unwrap(),
                want,
                "{}: encoding {text:?}",
                self.name
            );
            assert_eq!(
                tok.decode(&want, false).unwrap(),
                probe["decoded"].as_str().unwrap(),
                "{}: decoding {text:?}",
                self.name
            );
        }
        let chat = &g["prompts"]["chat"];
        let msgs = [ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }];
        let rendered = tok.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(
            rendered,
            chat["prompt_text"].as_str().unwrap(),
            "{}: chat template",
            self.name
        );
        assert_eq!(
            tok.encode(&rendered, true).unwrap(),
            json_ids(&chat["prompt_ids"]),
            "{}: chat prompt ids",
            self.name
        );
    }

    /// Runs the plain prompt through `engine` and compares the last
    /// position's logits with transformers': max |err| <= `tol` and NMSE <=
    /// `nmse_tol`. Returns both measures.
    pub fn check_last_logits<E: Engine>(&self, engine: &E, what: &str, tol: f32, nmse_tol: f64) -> (f32, f64) {
        let prompt = json_ids(&self.golden["prompts"]["plain"]["prompt_ids"]);
        let mut seq = engine.new_sequence();
        let got = crate::forward(engine, &mut [(&mut seq, &prompt[..])], Logits::Last)
            .unwrap()
            .remove(0);
        let want = self.last_logits();
        let (err, at) = max_abs_diff(&got, &want);
        let e2 = nmse(&got, &want);
        eprintln!(
            "{} ({what}) last-position logits: max |err| = {err:.2e} (token {at}), NMSE = {e2:.2e}",
            self.name
        );
        assert!(
            err <= tol && e2 <= nmse_tol,
            "{} ({what}): max |err| {err} (limit {tol}) at token {at}: got {} want {}; NMSE {e2} (limit {nmse_tol})",
            self.name,
            got[at],
            want[at]
        );
        (err, e2)
    }

    /// Greedy decoding from each named prompt gives transformers' tokens,
    /// text and finish reason.
    pub fn check_greedy<E: Engine>(&self, engine: &E, tok: &Tokenizer, what: &str, prompts: &[&str]) {
        for &name in prompts {
            let p = &self.golden["prompts"][name];
            let prompt = json_ids(&p["prompt_ids"]);
            let want = json_ids(&p["greedy_new_ids"]);
            let opts = GenerateOptions {
                max_new_tokens: want.len(),
                ..GenerateOptions::default()
            };
            let mut streamed = String::new();
            let out = generate(engine, tok, &prompt, &opts, |s| streamed.push_str(s)).unwrap();
            // Both keep the final EOS id in the token list; our text drops it.
            assert_eq!(out.tokens, want, "{} ({what}) {name}: greedy token ids", self.name);
            let eos = p["stopped_at_eos"].as_bool().unwrap();
            assert_eq!(
                out.finish == FinishReason::Eos,
                eos,
                "{} ({what}) {name}: finish reason {:?}",
                self.name,
                out.finish
            );
            assert_eq!(
                out.text,
                p["greedy_text_skip_special"].as_str().unwrap(),
                "{} ({what}) {name}: text",
                self.name
            );
            assert_eq!(
                streamed, out.text,
                "{} ({what}) {name}: streamed text equals the final text",
                self.name
            );
            eprintln!("{} ({what}) {name}: {:?}", self.name, out.text);
        }
    }
}

/// The `logits` tensor of a safetensors file.
fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f32s(
        st.tensor("logits")
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .data(),
    )
}
