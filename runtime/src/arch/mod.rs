//! Architectures: each module maps one checkpoint family's config spelling
//! onto [`ModelConfig`]; [`build`] then loads the weights by their
//! checkpoint names (with GGUF names translated in `gguf_names`).
//!
//! Tensor layouts accepted for routed experts, tried in this order:
//! - per expert, `mlp.experts.{e}.{gate,up,down}_proj.weight` (OLMoE, Qwen);
//! - per expert, Mixtral's `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`;
//! - stacked, transformers 5's `mlp.experts.gate_up_proj` (E, 2I, C) and
//!   `mlp.experts.down_proj` (E, C, I);
//! - stacked GGUF `blk.{l}.ffn_{gate,up,down}_exps.weight`.

mod gguf_names;
mod llama;
mod mixtral;
mod olmoe;
mod qwen2;
mod qwen2_moe;
mod qwen3;
mod qwen3_moe;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use gguf_names::{GgufSource, config_from_gguf};

use crate::config::{Arch, ModelConfig, QkNorm, RopeStyle};
use crate::error::{Error, Result};
use crate::linear::QLinear;
use crate::model::{Attention, Ffn, Layer, Mlp, Model, Moe};
use crate::safetensors_dir::TensorSource;
use crate::tensor::WeightVec;

/// Typed access to a `config.json`, with errors that name the field.
pub struct HfConfig<'a> {
    pub path: &'a Path,
    pub json: &'a Value,
}

impl HfConfig<'_> {
    fn err(&self, field: &str, reason: &str) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, &format!("expected a non-negative integer, found {v}"))),
        }
    }

    /// The first of several spellings of one field (e.g. the expert count).
    pub fn usize_any(&self, fields: &[&str]) -> Result<usize> {
        for f in fields {
            if let Some(v) = self.opt_usize(f)? {
                return Ok(v);
            }
        }
        Err(self.err(&fields.join(" | "), "missing"))
    }

    pub fn f32_or(&self, field: &str, default: f32) -> Result<f32> {
        self.opt_f32(field).map(|v| v.unwrap_or(default))
    }

    pub fn opt_f32(&self, field: &str) -> Result<Option<f32>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.err(field, &format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, &format!("expected true or false, found {v}"))),
        }
    }

    pub fn usize_list(&self, field: &str) -> Result<Vec<usize>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.err(field, "expected integers"))
                })
                .collect(),
            Some(v) => Err(self.err(field, &format!("expected a list, found {v}"))),
        }
    }

    /// `rope_theta`: top level in older files, `rope_parameters.rope_theta`
    /// in transformers 5. Rope scaling variants are not implemented, so a
    /// checkpoint that asks for one is refused rather than run wrongly.
    pub fn rope_theta(&self) -> Result<f32> {
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(kind) = self.get(key).and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
                && kind.as_str() != Some("default")
            {
                return Err(self.err(key, &format!("rope type {kind} is not supported (only \"default\")")));
            }
        }
        if let Some(t) = self.opt_f32("rope_theta")? {
            return Ok(t);
        }
        match self
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(|v| v.as_f64())
        {
            Some(t) => Ok(t as f32),
            None => Err(self.err("rope_theta", "missing (also not in rope_parameters)")),
        }
    }

    /// The fields every supported decoder shares.
    pub fn base(&self, arch: Arch) -> Result<ModelConfig> {
        let hidden = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        let head_dim = self
            .opt_usize("head_dim")?
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let cfg = ModelConfig {
            arch,
            vocab_size: self.usize("vocab_size")?,
            hidden_size: hidden,
            num_layers: self.usize("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: self.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            intermediate_size: self.usize("intermediate_size")?,
            rms_norm_eps: self.f32_or("rms_norm_eps", 1e-6)?,
            rope_theta: self.rope_theta()?,
            rope_style: RopeStyle::NeoX,
            max_position_embeddings: self.usize("max_position_embeddings")?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attention_bias: self.bool_or("attention_bias", false)?,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: None,
            moe: None,
        };
        if !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(self.err("num_key_value_heads", "must divide num_attention_heads"));
        }
        if head_dim % 2 != 0 {
            return Err(self.err("head_dim", "must be even for rotary embeddings"));
        }
        Ok(cfg)
    }
}

/// Reads `config.json` and dispatches on `model_type`.
pub fn config_from_hf(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: "config.json",
        reason: e.to_string(),
    })?;
    let c = HfConfig { path, json: &json };
    let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let unsupported = |arch: &str| Error::UnsupportedArch {
        path: path.to_path_buf(),
        arch: arch.to_string(),
        supported: Arch::SUPPORTED,
    };
    match model_type {
        "llama" => llama::config(&c),
        "qwen2" => qwen2::config(&c),
        "qwen3" => qwen3::config(&c),
        "mixtral" => mixtral::config(&c),
        "olmoe" => olmoe::config(&c),
        "qwen2_moe" => qwen2_moe::config(&c),
        "qwen3_moe" => qwen3_moe::config(&c),
        "" => Err(c.err("model_type", "missing")),
        other => Err(unsupported(other)),
    }
}

/// Loads every weight of `cfg`'s model from `src`, checking each shape.
pub fn build(cfg: ModelConfig, src: &dyn TensorSource) -> Result<Model> {
    let w = Weights { src };
    let (c, v, d) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
    let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let embed_tokens = w.tensor("model.embed_tokens.weight", &[v, c])?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let bias = |name: &str, n: usize| -> Result<Option<WeightVec>> {
            if cfg.attention_bias {
                w.vector(&format!("{p}.self_attn.{name}.bias"), n).map(Some)
            } else {
                Ok(None)
            }
        };
        let (qn, kn) = match cfg.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::Full => (Some(qd), Some(kvd)),
            QkNorm::PerHead => (Some(d), Some(d)),
        };
        let norm = |name: &str, n: Option<usize>| {
            n.map(|n| w.vector(&format!("{p}.self_attn.{name}.weight"), n))
                .transpose()
        };
        let self_attn = Attention {
            q_proj: QLinear::with_bias(
                w.tensor(&format!("{p}.self_attn.q_proj.weight"), &[qd, c])?,
                bias("q_proj", qd)?,
            ),
            k_proj: QLinear::with_bias(
                w.tensor(&format!("{p}.self_attn.k_proj.weight"), &[kvd, c])?,
                bias("k_proj", kvd)?,
            ),
            v_proj: QLinear::with_bias(
                w.tensor(&format!("{p}.self_attn.v_proj.weight"), &[kvd, c])?,
                bias("v_proj", kvd)?,
            ),
            o_proj: QLinear::new(w.tensor(&format!("{p}.self_attn.o_proj.weight"), &[c, qd])?, None),
            q_norm: norm("q_norm", qn)?,
            k_norm: norm("k_norm", kn)?,
        };
        let ffn = match &cfg.moe {
            Some(m) if cfg.is_moe_layer(l) => Ffn::Moe(w.moe(l, c, m)?),
            _ => Ffn::Dense(w.mlp(&format!("{p}.mlp"), c, cfg.intermediate_size)?),
        };
        layers.push(Layer {
            input_layernorm: w.vector(&format!("{p}.input_layernorm.weight"), c)?,
            self_attn,
            post_attention_layernorm: w.vector(&format!("{p}.post_attention_layernorm.weight"), c)?,
            ffn,
        });
    }
    let lm_head = if src.contains("lm_head.weight") {
        w.tensor("lm_head.weight", &[v, c])?
    } else if cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        return Err(Error::MissingTensor {
            path: src.path().to_path_buf(),
            name: "lm_head.weight".into(),
        });
    };
    Ok(Model {
        norm: w.vector("model.norm.weight", c)?,
        lm_head: QLinear::new(lm_head, None),
        embed_tokens,
        layers,
        config: cfg,
    })
}

struct Weights<'a> {
    src: &'a dyn TensorSource,
}

impl Weights<'_> {
    fn path(&self) -> PathBuf {
        self.src.path().to_path_buf()
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<crate::QTensor> {
        let t = self.src.get(name)?;
        if t.shape != shape {
            return Err(Error::Shape {
                path: self.path(),
                name: name.into(),
                expected: shape.to_vec(),
                found: t.shape,
            });
        }
        // Quantised rows must hold whole blocks, or rows could not be sliced.
        let (block, _) = t.dtype.block();
        if t.cols() % block != 0 {
            return Err(Error::DType {
                path: self.path(),
                name: name.into(),
                dtype: format!(
                    "{} with rows of {} values (not a multiple of {block})",
                    t.dtype,
                    t.cols()
                ),
            });
        }
        Ok(t)
    }

    fn vector(&self, name: &str, n: usize) -> Result<WeightVec> {
        Ok(WeightVec::from_tensor(self.tensor(name, &[n])?))
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<QLinear> {
        Ok(QLinear::new(self.tensor(name, &[out, inp])?, None))
    }

    fn mlp(&self, p: &str, c: usize, i: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: self.linear(&format!("{p}.gate_proj.weight"), i, c)?,
            up_proj: self.linear(&format!("{p}.up_proj.weight"), i, c)?,
            down_proj: self.linear(&format!("{p}.down_proj.weight"), c, i)?,
        })
    }

    fn moe(&self, l: usize, c: usize, m: &crate::config::MoeConfig) -> Result<Moe> {
        let (e_count, i) = (m.num_experts, m.expert_intermediate_size);
        let mlp = format!("model.layers.{l}.mlp");
        let mixtral = format!("model.layers.{l}.block_sparse_moe");
        let gguf = format!("blk.{l}");
        let gate_name = if self.src.contains(&format!("{mixtral}.gate.weight")) {
            format!("{mixtral}.gate.weight")
        } else {
            format!("{mlp}.gate.weight")
        };
        let gate = self.linear(&gate_name, e_count, c)?;
        let experts = if self.src.contains(&format!("{mlp}.experts.0.gate_proj.weight")) {
            (0..e_count)
                .map(|e| self.mlp(&format!("{mlp}.experts.{e}"), c, i))
                .collect::<Result<Vec<_>>>()?
        } else if self.src.contains(&format!("{mixtral}.experts.0.w1.weight")) {
            (0..e_count)
                .map(|e| {
                    let p = format!("{mixtral}.experts.{e}");
                    Ok(Mlp {
                        gate_proj: self.linear(&format!("{p}.w1.weight"), i, c)?,
                        up_proj: self.linear(&format!("{p}.w3.weight"), i, c)?,
                        down_proj: self.linear(&format!("{p}.w2.weight"), c, i)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else if let Some(gate_up) = self.first_present(&[
            &format!("{mlp}.experts.gate_up_proj"),
            &format!("{mlp}.experts.gate_up_proj.weight"),
        ]) {
            // transformers 5: gate rows first, then up rows, per expert.
            let gu = self.tensor(&gate_up, &[e_count, 2 * i, c])?;
            let down_name = self
                .first_present(&[
                    &format!("{mlp}.experts.down_proj"),
                    &format!("{mlp}.experts.down_proj.weight"),
                ])
                .unwrap_or_else(|| format!("{mlp}.experts.down_proj"));
            let down = self.tensor(&down_name, &[e_count, c, i])?;
            (0..e_count)
                .map(|e| Mlp {
                    gate_proj: QLinear::new(gu.rows_view(e * 2 * i, i, format!("{gate_up}[{e}].gate")), None),
                    up_proj: QLinear::new(gu.rows_view(e * 2 * i + i, i, format!("{gate_up}[{e}].up")), None),
                    down_proj: QLinear::new(down.index0(e, format!("{down_name}[{e}]")), None),
                })
                .collect()
        } else {
            let g = self.tensor(&format!("{gguf}.ffn_gate_exps.weight"), &[e_count, i, c])?;
            let u = self.tensor(&format!("{gguf}.ffn_up_exps.weight"), &[e_count, i, c])?;
            let dn = self.tensor(&format!("{gguf}.ffn_down_exps.weight"), &[e_count, c, i])?;
            (0..e_count)
                .map(|e| Mlp {
                    gate_proj: QLinear::new(g.index0(e, format!("{gguf}.ffn_gate_exps[{e}]")), None),
                    up_proj: QLinear::new(u.index0(e, format!("{gguf}.ffn_up_exps[{e}]")), None),
                    down_proj: QLinear::new(dn.index0(e, format!("{gguf}.ffn_down_exps[{e}]")), None),
                })
                .collect()
        };
        let shared_expert = match m.shared_expert_intermediate_size {
            None => None,
            Some(si) => Some((
                self.mlp(&format!("{mlp}.shared_expert"), c, si)?,
                self.linear(&format!("{mlp}.shared_expert_gate.weight"), 1, c)?,
            )),
        };
        Ok(Moe {
            gate,
            experts,
            shared_expert,
        })
    }

    fn first_present(&self, names: &[&str]) -> Option<String> {
        names.iter().find(|n| self.src.contains(n)).map(|n| n.to_string())
    }
}
