//! Tensor sources: where the model builder gets its weights from.
//!
//! `SafetensorsDir` reads a Hugging Face checkpoint directory: one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`.
//! Files are memory-mapped, and tensors are zero-copy views into the maps.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{Buffer, DType, QTensor};

/// What `lynx inspect` shows about one stored tensor.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// Anything that can hand out named weight tensors.
pub trait TensorSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    fn get(&self, name: &str) -> Result<QTensor>;
    fn infos(&self) -> Vec<TensorInfo>;
}

struct Entry {
    file: usize,
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Buffer>)>,
    entries: BTreeMap<String, Entry>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
                path: index.clone(),
                format: "safetensors index JSON",
                reason: e.to_string(),
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    path: index.clone(),
                    field: "weight_map".into(),
                    reason: "missing or not an object".into(),
                })?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            // Unindexed shards; other safetensors files beside a model
            // (adapters, test data) are not part of it.
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    name.starts_with("model-") && name.ends_with(".safetensors")
                })
                .collect();
            found.sort();
            found
        };
        if file_names.is_empty() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                format: "Hugging Face checkpoint",
                reason: "no model.safetensors, model-*.safetensors shards or model.safetensors.index.json".into(),
            });
        }
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, path) in file_names.into_iter().enumerate() {
            let buf = map_file(&path)?;
            for (name, entry) in parse_header(&path, buf.bytes(), fi)? {
                entries.insert(name, entry);
            }
            files.push((path, buf));
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }
}

fn map_file(path: &Path) -> Result<Arc<Buffer>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(Buffer::map_file(&file, path)?))
}

/// Parses one safetensors header and checks every tensor's byte range.
fn parse_header(path: &Path, bytes: &[u8], file: usize) -> Result<HashMap<String, Entry>> {
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        format: "safetensors",
        reason,
    };
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut out = HashMap::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => Ok(DType::F32),
            safetensors::Dtype::F16 => Ok(DType::F16),
            safetensors::Dtype::BF16 => Ok(DType::BF16),
            other => Err(format!("{other:?}")),
        };
        let (begin, end) = info.data_offsets;
        let range = data_start + begin..data_start + end;
        if range.end > bytes.len() {
            return Err(bad(format!(
                "tensor `{name}` ends at byte {} but the file has {}",
                range.end,
                bytes.len()
            )));
        }
        if let Ok(dt) = dtype {
            let want = QTensor::expected_bytes(dt, &info.shape);
            if want != range.len() {
                return Err(bad(format!(
                    "tensor `{name}` has {} bytes, its shape {:?} needs {want}",
                    range.len(),
                    info.shape
                )));
            }
        }
        out.insert(
            name,
            Entry {
                file,
                dtype,
                shape: info.shape.clone(),
                range,
            },
        );
    }
    Ok(out)
}

impl TensorSource for SafetensorsDir {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<QTensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.into(),
        })?;
        let (path, buf) = &self.files[e.file];
        let dtype = e.dtype.clone().map_err(|dtype| Error::DType {
            path: path.clone(),
            name: name.into(),
            dtype,
        })?;
        Ok(QTensor::new(name, dtype, e.shape.clone(), buf.clone(), e.range.clone()))
    }

    fn infos(&self) -> Vec<TensorInfo> {
        self.entries
            .iter()
            .map(|(name, e)| TensorInfo {
                name: name.clone(),
                dtype: match &e.dtype {
                    Ok(d) => d.name().to_string(),
                    Err(s) => s.clone(),
                },
                shape: e.shape.clone(),
                bytes: e.range.len(),
            })
            .collect()
    }
}
