//! Writing a loaded model as a GGUF file in llama.cpp's layout for its
//! architecture (`llama` for Llama and Mixtral, `qwen2`, `qwen3`,
//! `qwen2moe`, `qwen3moe`, `olmoe`), quantising its matrices.
//! `lynx quantize` uses this so that the next load is fast and small, and
//! so that other GGUF readers take the file (transformers' GGUF loader
//! reads the Qwen2.5 file it writes; llama.cpp itself is not run in tests).
//!
//! Tensor names, metadata keys and the rope pairing are the ones
//! `arch::gguf_names` reads back, so every file we write round-trips.
//! Nothing is dropped: a matrix whose rows cannot be split into blocks of
//! the requested format falls back as llama.cpp's quantiser does (a K-quant
//! to the 32-value format of about the same size), and failing that keeps
//! the format it was stored in; the report lists every such tensor.

use std::path::Path;

use crate::config::{QkNorm, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::{GgufValue, write_gguf};
use crate::loader::LoadedModel;
use crate::model::{Ffn, Mlp};
use crate::tensor::{DType, QTensor, WeightVec, quantize};

/// A dense MLP's matrices by their llama.cpp role.
fn mlp_parts(m: &Mlp) -> [(&'static str, &QTensor); 3] {
    [
        ("ffn_gate", &m.gate_proj.weight),
        ("ffn_up", &m.up_proj.weight),
        ("ffn_down", &m.down_proj.weight),
    ]
}

/// What to write: the format of the weight matrices and, optionally, a
/// different one for the token embedding and the LM head (llama.cpp's
/// Q4_K_M keeps those larger, since every token reads them).
#[derive(Clone, Copy, Debug)]
pub struct ExportOptions {
    pub dtype: DType,
    pub embedding: Option<DType>,
}

impl ExportOptions {
    pub fn new(dtype: DType) -> Self {
        ExportOptions { dtype, embedding: None }
    }
}

/// What was written, for the command's summary.
#[derive(Debug, Default)]
pub struct ExportReport {
    /// The GGUF architecture name (`general.architecture`).
    pub arch: &'static str,
    pub tensors: usize,
    /// Matrices stored in another format than asked, with the format used
    /// and why.
    pub fallbacks: Vec<(String, DType, String)>,
}

/// The formats a matrix can be written in: every format Lynx decodes.
pub const EXPORT_DTYPES: [DType; 13] = DType::ALL;

/// llama.cpp's substitute for a K-quant on rows that are not whole 256-value
/// super-blocks (`llama_tensor_get_type`'s fallback): the 32-value format of
/// about the same size. IQ4_NL, its pick for Q2_K/Q3_K, is not one Lynx
/// decodes, so those take Q4_0.
fn row_fallback(dt: DType) -> Option<DType> {
    match dt {
        DType::Q2_K | DType::Q3_K => Some(DType::Q4_0),
        DType::Q4_K => Some(DType::Q5_0),
        DType::Q5_K => Some(DType::Q5_1),
        DType::Q6_K => Some(DType::Q8_0),
        _ => None,
    }
}

/// Writes `lm` to `path` with every matrix except the routers in `dtype`
/// (see [`write_model_gguf_with`]).
pub fn write_model_gguf(lm: &LoadedModel, dtype: DType, path: &Path) -> Result<ExportReport> {
    write_model_gguf_with(lm, ExportOptions::new(dtype), path, &mut |_, _| {})
}

/// Writes `lm` to `path`. Norms, biases and routers stay f32: they are tiny,
/// and routing decisions are sensitive to their precision. `progress` is
/// called with (layers done, layers) as the matrices are converted.
pub fn write_model_gguf_with(
    lm: &LoadedModel,
    opts: ExportOptions,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport> {
    let m = &lm.model;
    let cfg = &m.config;
    for dt in [Some(opts.dtype), opts.embedding].into_iter().flatten() {
        if !EXPORT_DTYPES.contains(&dt) {
            return Err(Error::InvalidArgument(format!("cannot write matrices as {dt}")));
        }
    }
    let arch = cfg.arch.gguf_name();
    // What llama.cpp cannot express is refused rather than written as a
    // different model.
    if let Some(w) = cfg.sliding_window {
        return Err(Error::InvalidArgument(format!(
            "{}: sliding-window attention ({w} positions) has no GGUF metadata key in llama.cpp's {arch} layout",
            lm.path.display()
        )));
    }
    if let Some(moe) = &cfg.moe
        && !moe.routing.softmax_then_topk
    {
        return Err(Error::InvalidArgument(format!(
            "{}: routing by top-k before the softmax has no GGUF metadata key",
            lm.path.display()
        )));
    }
    // llama.cpp's `llama` pairs rope dimensions (2i, 2i+1) and the other
    // architectures pair (i, i + D/2), as transformers does. When the model
    // in memory pairs the other way, Q and K rows (and their biases and
    // norms) are permuted, as llama.cpp's converter does for llama:
    // `w.reshape(H, 2, D // 2, C).swapaxes(1, 2).reshape(H * D, C)`.
    let target_style = if arch == "llama" {
        RopeStyle::Interleaved
    } else {
        RopeStyle::NeoX
    };
    let d = cfg.head_dim;
    let head_perm = |heads: usize| -> Option<Vec<usize>> {
        if cfg.rope_style == target_style {
            return None;
        }
        let to_interleaved: Vec<usize> = (0..heads * d)
            .map(|r| (r / d) * d + if r % 2 == 0 { (r % d) / 2 } else { (r % d) / 2 + d / 2 })
            .collect();
        Some(match target_style {
            RopeStyle::Interleaved => to_interleaved,
            // The inverse permutation undoes it.
            RopeStyle::NeoX => {
                let mut inv = vec![0; to_interleaved.len()];
                for (i, &r) in to_interleaved.iter().enumerate() {
                    inv[r] = i;
                }
                inv
            }
        })
    };
    let (q_perm, k_perm) = (head_perm(cfg.num_heads), head_perm(cfg.num_kv_heads));
    let per_head_perm = head_perm(1);

    let mut report = ExportReport {
        arch,
        ..ExportReport::default()
    };
    let mut owned: Vec<QTensor> = Vec::new();
    // A matrix in `want`, its rows reordered by `rows`.
    let mut conv = |name: String, t: &QTensor, want: DType, rows: Option<&[usize]>| -> QTensor {
        let cols = t.cols();
        let dt = if want.fits_cols(cols) {
            want
        } else if let Some(f) = row_fallback(want).filter(|f| f.fits_cols(cols)) {
            report.fallbacks.push((
                name.clone(),
                f,
                format!("rows of {cols} values are not whole {want} blocks"),
            ));
            f
        } else {
            report.fallbacks.push((
                name.clone(),
                t.dtype,
                format!("rows of {cols} values are not whole {want} blocks; kept as stored"),
            ));
            t.dtype
        };
        if dt == t.dtype {
            // Rows are whole blocks, so reordering them moves bytes only.
            let row_bytes = t.dtype.bytes_for(cols);
            let bytes = match rows {
                None => t.bytes().to_vec(),
                Some(order) => order
                    .iter()
                    .flat_map(|&r| &t.bytes()[r * row_bytes..(r + 1) * row_bytes])
                    .copied()
                    .collect(),
            };
            return QTensor::from_bytes(name, dt, t.shape.clone(), bytes);
        }
        let vals = t.to_f32();
        let vals = match rows {
            None => vals,
            Some(order) => order
                .iter()
                .flat_map(|&r| vals[r * cols..(r + 1) * cols].iter().copied())
                .collect(),
        };
        QTensor::from_bytes(name, dt, t.shape.clone(), quantize(dt, &vals))
    };
    let vector = |name: String, v: &[f32], order: Option<&[usize]>| {
        let v: Vec<f32> = match order {
            None => v.to_vec(),
            Some(o) => o.iter().map(|&i| v[i]).collect(),
        };
        QTensor::from_f32(name, vec![v.len()], &v)
    };
    let bias = |name: String, b: &Option<WeightVec>, order: Option<&[usize]>| {
        b.as_ref().map(|b| vector(name, &b.values, order))
    };

    let emb = opts.embedding.unwrap_or(opts.dtype);
    owned.push(conv("token_embd.weight".into(), &m.embed_tokens, emb, None));
    for (l, layer) in m.layers.iter().enumerate() {
        let p = |role: &str| format!("blk.{l}.{role}.weight");
        let pb = |role: &str| format!("blk.{l}.{role}.bias");
        let a = &layer.self_attn;
        owned.push(vector(p("attn_norm"), &layer.input_layernorm.values, None));
        owned.push(conv(p("attn_q"), &a.q_proj.weight, opts.dtype, q_perm.as_deref()));
        owned.push(conv(p("attn_k"), &a.k_proj.weight, opts.dtype, k_perm.as_deref()));
        owned.push(conv(p("attn_v"), &a.v_proj.weight, opts.dtype, None));
        owned.push(conv(p("attn_output"), &a.o_proj.weight, opts.dtype, None));
        owned.extend(bias(pb("attn_q"), &a.q_proj.bias, q_perm.as_deref()));
        owned.extend(bias(pb("attn_k"), &a.k_proj.bias, k_perm.as_deref()));
        owned.extend(bias(pb("attn_v"), &a.v_proj.bias, None));
        owned.extend(bias(pb("attn_output"), &a.o_proj.bias, None));
        // Per-head norms (Qwen3) are (D,); OLMoE's span all heads, (H*D,).
        let (qn, kn) = match cfg.qk_norm {
            QkNorm::PerHead => (per_head_perm.as_deref(), per_head_perm.as_deref()),
            _ => (q_perm.as_deref(), k_perm.as_deref()),
        };
        owned.extend(bias(p("attn_q_norm"), &a.q_norm, qn));
        owned.extend(bias(p("attn_k_norm"), &a.k_norm, kn));
        owned.push(vector(p("ffn_norm"), &layer.post_attention_layernorm.values, None));
        match &layer.ffn {
            Ffn::Dense(m) => {
                for (role, w) in mlp_parts(m) {
                    owned.push(conv(p(role), w, opts.dtype, None));
                }
            }
            Ffn::Moe(moe) => {
                owned.push(conv(p("ffn_gate_inp"), &moe.gate.weight, DType::F32, None));
                // The experts' matrices (same shape) as one (E, rows, cols)
                // tensor each; all are converted alike, so they share a format.
                type Pick = fn(&Mlp) -> &QTensor;
                let picks: [(&str, Pick); 3] = [
                    ("ffn_gate_exps", |e| &e.gate_proj.weight),
                    ("ffn_up_exps", |e| &e.up_proj.weight),
                    ("ffn_down_exps", |e| &e.down_proj.weight),
                ];
                for (role, pick) in picks {
                    let name = p(role);
                    let parts: Vec<QTensor> = moe
                        .experts
                        .iter()
                        .enumerate()
                        .map(|(e, x)| {
                            // Only the first expert's fallback is reported.
                            let n = if e == 0 { name.clone() } else { String::new() };
                            conv(n, pick(x), opts.dtype, None)
                        })
                        .collect();
                    let dt = parts[0].dtype;
                    let mut shape = vec![parts.len()];
                    shape.extend(&parts[0].shape);
                    let bytes = parts.iter().flat_map(|t| t.bytes().iter().copied()).collect();
                    owned.push(QTensor::from_bytes(name, dt, shape, bytes));
                }
                if let Some((shared, gate)) = &moe.shared_expert {
                    for (role, w) in mlp_parts(shared) {
                        owned.push(conv(p(&format!("{role}_shexp")), w, opts.dtype, None));
                    }
                    // llama.cpp stores this (1, C) gate as a vector.
                    owned.push(vector(p("ffn_gate_inp_shexp"), &gate.weight.to_f32(), None));
                }
            }
        }
        progress(l + 1, m.layers.len());
    }
    owned.push(vector("output_norm.weight".into(), &m.norm.values, None));
    if !cfg.tie_word_embeddings {
        owned.push(conv("output.weight".into(), &m.lm_head.weight, emb, None));
    }
    report.fallbacks.retain(|(name, _, _)| !name.is_empty());

    let key = |k: &str| format!("{arch}.{k}");
    let u = |v: usize| GgufValue::U32(v as u32);
    let mut meta: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), arch.into()),
        (
            "general.name".into(),
            lm.path
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().to_string())
                .into(),
        ),
        ("general.file_type".into(), u(file_type(opts.dtype))),
        (key("block_count"), u(cfg.num_layers)),
        (key("context_length"), u(cfg.max_position_embeddings)),
        (key("embedding_length"), u(cfg.hidden_size)),
        (key("feed_forward_length"), u(cfg.intermediate_size)),
        (key("attention.head_count"), u(cfg.num_heads)),
        (key("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (key("attention.key_length"), u(cfg.head_dim)),
        (key("attention.value_length"), u(cfg.head_dim)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(cfg.rms_norm_eps),
        ),
        (key("rope.freq_base"), GgufValue::F32(cfg.rope_theta)),
        (key("rope.dimension_count"), u(cfg.head_dim)),
        (key("vocab_size"), u(cfg.vocab_size)),
    ];
    if let Some(c) = cfg.clip_qkv {
        meta.push((key("attention.clamp_kqv"), GgufValue::F32(c)));
    }
    if let Some(moe) = &cfg.moe {
        meta.push((key("expert_count"), u(moe.num_experts)));
        meta.push((key("expert_used_count"), u(moe.top_k)));
        meta.push((key("expert_feed_forward_length"), u(moe.expert_intermediate_size)));
        meta.push((key("expert_weights_norm"), GgufValue::Bool(moe.routing.renormalize)));
        if let Some(s) = moe.shared_expert_intermediate_size {
            meta.push((key("expert_shared_feed_forward_length"), u(s)));
        }
    }
    if let Some(tok) = &lm.tokenizer {
        meta.extend(tok.gguf_metadata()?);
    }
    report.tensors = owned.len();
    let refs: Vec<&QTensor> = owned.iter().collect();
    write_gguf(path, &meta, &refs)?;
    Ok(report)
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a file whose
/// matrices are mostly `dt`; the K-quants are the `_M` mixes' numbers.
fn file_type(dt: DType) -> usize {
    match dt {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::Q5_0 => 8,
        DType::Q5_1 => 9,
        DType::Q2_K => 10,
        DType::Q3_K => 12,
        DType::Q4_K => 15,
        DType::Q5_K => 17,
        DType::Q6_K => 18,
        DType::BF16 => 32,
    }
}
