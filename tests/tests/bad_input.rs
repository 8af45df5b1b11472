//! Bad input gives a clear error that names the culprit, never a panic.

use std::fs;

use lynx::{Error, Logits, load};
use lynx_tests::{copy_fixture, fixtures_dir, temp_dir};

fn load_err(path: &std::path::Path) -> Error {
    match load(path) {
        Ok(_) => panic!("{} loaded, but it should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_path_is_reported() {
    let e = load_err(std::path::Path::new("/no/such/model.gguf"));
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("/no/such/model.gguf"), "{e}");
}

#[test]
fn directory_without_config_is_reported() {
    let dir = temp_dir("noconfig");
    let e = load_err(&dir);
    assert!(e.to_string().contains("no config.json"), "{e}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = temp_dir("trunc-st");
    copy_fixture("llama", &dir);
    let st = dir.join("model.safetensors");
    let len = fs::metadata(&st).unwrap().len();
    // Cut inside the data, inside the header, and inside the length prefix.
    for cut in [len - 100, 200, 5] {
        let bytes = fs::read(fixtures_dir().join("llama/model.safetensors")).unwrap();
        fs::write(&st, &bytes[..cut as usize]).unwrap();
        let e = load_err(&dir);
        assert!(matches!(e, Error::Format { .. }), "cut at {cut}: {e:?}");
        assert!(e.to_string().contains("model.safetensors"), "cut at {cut}: {e}");
    }
}

#[test]
fn unknown_architecture_is_reported() {
    let dir = temp_dir("arch");
    copy_fixture("llama", &dir);
    let cfg = fs::read_to_string(dir.join("config.json")).unwrap();
    fs::write(dir.join("config.json"), cfg.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, Error::UnsupportedArch { .. }), "{e:?}");
    assert!(e.to_string().contains("gpt_neox"), "{e}");
}

#[test]
fn missing_config_field_names_the_field() {
    let dir = temp_dir("field");
    copy_fixture("mixtral", &dir);
    let cfg = fs::read_to_string(dir.join("config.json")).unwrap();
    fs::write(
        dir.join("config.json"),
        cfg.replace("\"num_experts_per_tok\"", "\"k_renamed\""),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
}

#[test]
fn wrong_shape_names_the_tensor() {
    let dir = temp_dir("shape");
    copy_fixture("llama", &dir);
    // The checkpoint claims a larger hidden size than its tensors have.
    let cfg = fs::read_to_string(dir.join("config.json")).unwrap();
    fs::write(
        dir.join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    assert!(e.to_string().contains("gate_proj"), "{e}");
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let dir = temp_dir("dtype");
    copy_fixture("llama", &dir);
    // Rewrite the checkpoint with one tensor stored as I32.
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    for (name, view) in tensors.iter_mut() {
        if name == "model.norm.weight" {
            *view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, view.shape().to_vec(), view.data())
                .unwrap();
        }
    }
    let out = safetensors::serialize(tensors, None).unwrap();
    fs::write(dir.join("model.safetensors"), out).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, Error::DType { .. }), "{e:?}");
    assert!(
        e.to_string().contains("model.norm.weight") && e.to_string().contains("I32"),
        "{e}"
    );
}

#[test]
fn truncated_gguf_is_reported_at_every_cut() {
    let dir = temp_dir("trunc-gguf");
    let m = load(&fixtures_dir().join("mixtral")).unwrap();
    let path = dir.join("mixtral.gguf");
    lynx::export::write_model_gguf(&m, lynx::DType::Q8_0, &path).unwrap();
    let full = fs::read(&path).unwrap();
    assert!(load(&path).is_ok(), "the untruncated file loads");
    let cut_path = dir.join("cut.gguf");
    for cut in (4..full.len()).step_by(full.len() / 37) {
        fs::write(&cut_path, &full[..cut]).unwrap();
        let e = load_err(&cut_path);
        assert!(e.to_string().contains("cut.gguf"), "cut at {cut}: {e}");
    }
}

#[test]
fn prompt_longer_than_context_is_refused_before_any_work() {
    let m = load(&fixtures_dir().join("llama")).unwrap();
    let ctx = m.model.config.max_position_embeddings;
    let mut seq = m.model.new_sequence();
    let too_long = vec![1u32; ctx + 1];
    let e = m
        .model
        .forward(&mut [(&mut seq, &too_long[..])], Logits::Last)
        .unwrap_err();
    assert!(
        matches!(e, Error::ContextOverflow { requested, limit } if requested == ctx + 1 && limit == ctx),
        "{e:?}"
    );
    assert_eq!(seq.len(), 0, "a refused batch leaves the KV cache untouched");
    // Exactly the context length is fine, and one more token is not.
    let full = vec![1u32; ctx];
    m.model.forward(&mut [(&mut seq, &full[..])], Logits::Last).unwrap();
    let e = m
        .model
        .forward(&mut [(&mut seq, &[1u32][..])], Logits::Last)
        .unwrap_err();
    assert!(matches!(e, Error::ContextOverflow { .. }), "{e:?}");
}

#[test]
fn token_outside_vocabulary_is_refused() {
    let m = load(&fixtures_dir().join("llama")).unwrap();
    let v = m.model.config.vocab_size as u32;
    let mut seq = m.model.new_sequence();
    let e = m
        .model
        .forward(&mut [(&mut seq, &[0, v][..])], Logits::Last)
        .unwrap_err();
    assert!(matches!(e, Error::TokenOutOfRange { id, .. } if id == v), "{e:?}");
}

/// Loads the mixtral fixture after `edit` rewrote its config.json, and
/// returns the error.
fn edited_config_error(tag: &str, edit: impl Fn(&mut serde_json::Value)) -> Error {
    let dir = temp_dir(tag);
    copy_fixture("mixtral", &dir);
    let path = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    load_err(&dir)
}

/// [`edited_config_error`], which must name `field`.
fn hf_config_error(tag: &str, edit: impl Fn(&mut serde_json::Value), field: &str) {
    let e = edited_config_error(tag, edit);
    assert!(
        e.to_string().contains(field),
        "{tag}: the error should name `{field}`: {e}"
    );
}

#[test]
fn absurd_config_json_values_name_the_field() {
    let cases: &[(&str, &str, serde_json::Value, &str)] = &[
        ("zero-hidden", "hidden_size", 0.into(), "hidden_size"),
        ("zero-heads", "num_attention_heads", 0.into(), "num_attention_heads"),
        ("zero-kv", "num_key_value_heads", 0.into(), "num_key_value_heads"),
        ("kv-not-divisor", "num_key_value_heads", 3.into(), "num_key_value_heads"),
        ("zero-head-dim", "head_dim", 0.into(), "head_dim"),
        ("zero-vocab", "vocab_size", 0.into(), "vocab_size"),
        ("zero-layers", "num_hidden_layers", 0.into(), "num_hidden_layers"),
        ("zero-topk", "num_experts_per_tok", 0.into(), "num_experts_per_tok"),
        (
            "topk-over-experts",
            "num_experts_per_tok",
            9.into(),
            "num_experts_per_tok",
        ),
        ("zero-experts", "num_local_experts", 0.into(), "num_local_experts"),
        ("huge-vocab", "vocab_size", (1u64 << 40).into(), "vocab_size"),
        (
            "huge-context",
            "max_position_embeddings",
            (1u64 << 40).into(),
            "max_position_embeddings",
        ),
    ];
    for (tag, key, value, field) in cases {
        let value = value.clone();
        hf_config_error(tag, |j| j[*key] = value.clone(), field);
    }
    // Large enough to pass the per-field bounds, but hidden * vocab is
    // 2^20 * 2^20 elements: refused before the embedding is looked at.
    hf_config_error(
        "huge-product",
        |j| {
            j["hidden_size"] = (1u64 << 20).into();
            j["vocab_size"] = (1u64 << 20).into();
        },
        "vocab_size",
    );
}

#[test]
fn more_layers_than_tensors_names_the_first_missing_layer() {
    let e = edited_config_error("layers", |j| j["num_hidden_layers"] = 1000.into());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("model.layers.2."), "{e}");
}

/// Writes the mixtral fixture as a GGUF whose metadata `edit` changed.
fn gguf_with_metadata(
    tag: &str,
    edit: impl Fn(&mut std::collections::BTreeMap<String, lynx::gguf::GgufValue>),
) -> std::path::PathBuf {
    let dir = temp_dir(tag);
    let m = load(&fixtures_dir().join("mixtral")).unwrap();
    let good = dir.join("good.gguf");
    lynx::export::write_model_gguf(&m, lynx::DType::Q8_0, &good).unwrap();
    rewrite_gguf(&good, tag, edit)
}

/// Copies the GGUF at `src` with its metadata changed by `edit`.
fn rewrite_gguf(
    src: &std::path::Path,
    tag: &str,
    edit: impl Fn(&mut std::collections::BTreeMap<String, lynx::gguf::GgufValue>),
) -> std::path::PathBuf {
    let file = lynx::gguf::GgufFile::open(src).unwrap();
    let mut meta = file.metadata.clone();
    edit(&mut meta);
    let tensors: Vec<lynx::QTensor> = file.tensors.iter().map(|t| file.tensor(&t.name).unwrap()).collect();
    let refs: Vec<&lynx::QTensor> = tensors.iter().collect();
    let meta: Vec<(String, lynx::gguf::GgufValue)> = meta.into_iter().collect();
    let bad = temp_dir(tag).join("bad.gguf");
    lynx::gguf::write_gguf(&bad, &meta, &refs).unwrap();
    bad
}

/// llama.cpp-style files (the K-quant fixtures of `gguf_archs.rs`) whose
/// metadata asks for something Lynx does not run: the error names the key
/// and says what is supported instead of loading a wrong model.
#[test]
fn unsupported_gguf_features_name_the_key() {
    use lynx::gguf::GgufValue::{self as V, U32};
    let src = fixtures_dir().join("gguf/qwen3moe.gguf");
    let cases: [(&str, &str, Option<lynx::gguf::GgufValue>, &str); 6] = [
        (
            "u-no-experts",
            "qwen3moe.expert_count",
            None,
            "this architecture has experts",
        ),
        (
            "u-yarn",
            "qwen3moe.rope.scaling.type",
            Some(V::String("yarn".into())),
            "rope scaling `yarn`",
        ),
        (
            "u-partial-rope",
            "qwen3moe.rope.dimension_count",
            Some(U32(32)),
            "partial rotary",
        ),
        (
            "u-value-length",
            "qwen3moe.attention.value_length",
            Some(U32(32)),
            "differs from the key length",
        ),
        (
            "u-arch",
            "general.architecture",
            Some(V::String("gemma3".into())),
            "qwen3moe",
        ),
        // Validation names the key with this file's architecture prefix.
        (
            "u-topk",
            "qwen3moe.expert_used_count",
            Some(U32(0)),
            "must be between 1",
        ),
    ];
    for (tag, key, value, want) in cases {
        let path = rewrite_gguf(&src, tag, |m| match &value {
            Some(v) => {
                m.insert(key.to_string(), v.clone());
            }
            None => {
                m.remove(key);
            }
        });
        let e = load_err(&path).to_string();
        assert!(e.contains(want), "{tag}: {e}");
        if tag == "u-arch" {
            // The supported list is in the message, and the bad value too.
            assert!(e.contains("gemma3"), "{tag}: {e}");
        } else {
            assert!(e.contains(key), "{tag}: the error should name `{key}`: {e}");
        }
    }
}

#[test]
fn absurd_gguf_metadata_names_the_key() {
    use lynx::gguf::GgufValue::{U32, U64};
    let cases = [
        ("g-zero-heads", "llama.attention.head_count", U32(0)),
        ("g-zero-hidden", "llama.embedding_length", U32(0)),
        ("g-zero-kv", "llama.attention.head_count_kv", U32(0)),
        ("g-kv-not-divisor", "llama.attention.head_count_kv", U32(3)),
        ("g-zero-layers", "llama.block_count", U32(0)),
        ("g-topk-zero", "llama.expert_used_count", U32(0)),
        ("g-topk-over", "llama.expert_used_count", U32(9)),
        ("g-huge-context", "llama.context_length", U64(1 << 40)),
    ];
    for (tag, key, value) in cases {
        let path = gguf_with_metadata(tag, |m| {
            m.insert(key.to_string(), value.clone());
        });
        let e = load_err(&path);
        assert!(e.to_string().contains(key), "{tag}: the error should name `{key}`: {e}");
    }
    // A header that declares 1000 layers over 2 layers of tensors.
    let path = gguf_with_metadata("g-layers", |m| {
        m.insert("llama.block_count".into(), U32(1000));
    });
    let e = load_err(&path);
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("model.layers.2."), "{e}");
}

#[test]
fn corrupted_gguf_bytes_give_errors_never_panics() {
    let dir = temp_dir("corrupt-gguf");
    let m = load(&fixtures_dir().join("mixtral")).unwrap();
    let path = dir.join("mixtral.gguf");
    lynx::export::write_model_gguf(&m, lynx::DType::Q8_0, &path).unwrap();
    let full = fs::read(&path).unwrap();
    let header_end = lynx::gguf::GgufFile::open(&path).unwrap().data_start;
    let bad = dir.join("bad.gguf");
    // A seeded xorshift picks the offsets and the bytes, so a failure can
    // be replayed from the offset in the message.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for round in 0..300 {
        let mut bytes = full.clone();
        // Corrupt inside the header, where every byte is structure.
        let at = (next() as usize) % header_end;
        let how = round % 3;
        match how {
            0 => bytes[at] = next() as u8,
            1 => bytes[at] = 0xFF,
            _ => bytes.truncate(at),
        }
        fs::write(&bad, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| load(&bad).map(|_| ()));
        match result {
            Err(_) => panic!("round {round}: corrupting byte {at} (mode {how}) panicked"),
            Ok(Err(_)) => errors += 1,
            // A changed byte inside a string (a name's letter, a token) can
            // still leave a loadable file.
            Ok(Ok(())) => assert!(how != 2, "round {round}: truncated at {at} but loaded"),
        }
    }
    assert!(errors > 100, "only {errors} of 300 corruptions were refused");
}
