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
