//! The library's error type. Every variant names the file, tensor or field
//! that is at fault, because that is what a user needs to fix the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("model path {0} does not exist")]
    NotFound(PathBuf),

    #[error("{path}: not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    #[error("{path}: field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error("unsupported architecture `{arch}` in {path} (supported: {supported})")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },

    #[error("tensor `{name}` is missing from {path}")]
    MissingTensor { path: PathBuf, name: String },

    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` in {path}: unsupported dtype {dtype}")]
    DType { path: PathBuf, name: String, dtype: String },

    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("prompt and generation need {requested} positions, but the model's context length is {limit}")]
    ContextOverflow { requested: usize, limit: usize },

    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A GPU failure (no adapter, a wgpu validation or out-of-memory error,
    /// a failed buffer read), with the operation that was being done.
    #[error("GPU: {0}")]
    Gpu(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
