//! `QTensor`: a weight tensor in its stored dtype or quant format, and the
//! scalar dequantisation routines that define what each format means.
//!
//! Shapes are in PyTorch order (`[rows, cols]` = `[out_features, in_features]`
//! for a linear weight); the last dimension is contiguous. Quantised formats
//! are GGUF-compatible blocks along the last dimension: 32 values for
//! Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, 256-value super-blocks for the K-quants
//! (Q2_K..Q6_K), so a K-quant row needs a multiple of 256 columns.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};

/// Element type or block-quantisation format of a stored tensor. The
/// K-quant variants keep ggml's spelling (`Q4_K`) so that they read like the
/// format names users see in file names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 values: one f16 scale `d`, then 32 i8 `q`; `x = d * q`.
    Q8_0,
    /// 32 values: one f16 scale `d`, then 16 bytes of nibbles; `x = d * (q - 8)`.
    Q4_0,
    /// 32 values: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `x = d * q + m`.
    Q4_1,
    /// 32 values: f16 `d`, u32 `qh` of fifth bits, 16 bytes of nibbles; `x = d * (q - 16)`.
    Q5_0,
    /// 32 values: f16 `d`, f16 `m`, u32 `qh`, 16 bytes of nibbles; `x = d * q + m`.
    Q5_1,
    /// 256 values: 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit `q`,
    /// f16 `d`, f16 `dmin`; `x = d * sc * q - dmin * m` per 16 values.
    Q2_K,
    /// 256 values: 32 bytes of high-bit mask, 64 bytes of 2-bit `q`, 12 bytes
    /// of 6-bit scales, f16 `d`; `x = d * (sc - 32) * q` with `q` in -4..3.
    Q3_K,
    /// 256 values: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins,
    /// 128 bytes of nibbles; `x = d * sc * q - dmin * m` per 32 values.
    Q4_K,
    /// 256 values: as Q4_K, with 32 bytes of fifth bits before the nibbles.
    Q5_K,
    /// 256 values: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 i8
    /// scales, f16 `d`; `x = d * sc * (q - 32)` per 16 values.
    Q6_K,
}

/// Number of values in one quantisation block of the 32-value formats, and
/// in one sub-block as the GPU kernels step through a row.
pub const QK: usize = 32;

/// Number of values in one K-quant super-block (Q2_K .. Q6_K).
pub const QK_K: usize = 256;

impl DType {
    /// Every dtype, in ggml type-id order after the plain float types.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ];

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q8_0 => (QK, 2 + QK),
            DType::Q4_0 => (QK, 2 + QK / 2),
            DType::Q4_1 => (QK, 4 + QK / 2),
            DType::Q5_0 => (QK, 22),
            DType::Q5_1 => (QK, 24),
            DType::Q2_K => (QK_K, 84),
            DType::Q3_K => (QK_K, 110),
            DType::Q4_K => (QK_K, 144),
            DType::Q5_K => (QK_K, 176),
            DType::Q6_K => (QK_K, 210),
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes used by `n` values; `n` must be a multiple of the block size.
    pub fn bytes_for(self, n: usize) -> usize {
        let (bv, bb) = self.block();
        n / bv * bb
    }

    /// Whether a row of `cols` values is whole blocks of this format (a
    /// K-quant row needs a multiple of 256, the others of 32 or 1).
    pub fn fits_cols(self, cols: usize) -> bool {
        cols.is_multiple_of(self.block().0)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Backing bytes: a memory-mapped file, an owned buffer, or a file whose
/// bytes are not in memory at all (see [`Buffer::Deferred`]).
pub enum Buffer {
    /// Memory maps exist only where the OS has them (not in wasm32).
    #[cfg(not(target_arch = "wasm32"))]
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
    /// A file of `len` bytes that is being streamed elsewhere (the browser
    /// demo streams a GGUF straight into GPU buffers). Tensors over it carry
    /// their shape, dtype and byte range but no bytes: [`QTensor::bytes`]
    /// is empty, and [`QTensor::is_resident`] is false. The GPU upload
    /// turns such tensors into write destinations for the stream.
    Deferred {
        len: usize,
    },
}

impl Buffer {
    /// Maps `file` read-only, or reads it into memory where memory maps do
    /// not exist (wasm32); `path` names it in errors.
    pub fn map_file(file: &std::fs::File, path: &std::path::Path) -> crate::Result<Buffer> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            // SAFETY: the map is read-only. As with every memory-mapped model
            // loader, the file must not be truncated or rewritten while it is
            // mapped; that is a documented precondition of loading a model.
            let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| crate::Error::io(path, e))?;
            Ok(Buffer::Mmap(map))
        }
        #[cfg(target_arch = "wasm32")]
        {
            use std::io::Read;
            let mut v = Vec::new();
            let mut f = file;
            f.read_to_end(&mut v).map_err(|e| crate::Error::io(path, e))?;
            Ok(Buffer::Owned(v))
        }
    }

    /// The bytes in memory: empty for a deferred buffer.
    pub fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Buffer::Mmap(m) => m,
            Buffer::Owned(v) => v,
            Buffer::Deferred { .. } => &[],
        }
    }

    /// The length of the data, in memory or not.
    pub fn len(&self) -> usize {
        match self {
            Buffer::Deferred { len } => *len,
            b => b.bytes().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_deferred(&self) -> bool {
        matches!(self, Buffer::Deferred { .. })
    }
}

/// A tensor whose bytes live in a shared buffer (usually a memory map), so
/// views such as one expert of a stacked tensor cost nothing.
#[derive(Clone)]
pub struct QTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    buf: Arc<Buffer>,
    range: Range<usize>,
}

impl std::fmt::Debug for QTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QTensor({} {} {:?})", self.name, self.dtype, self.shape)
    }
}

impl QTensor {
    /// Wraps `buf[range]`. The caller has checked that the range holds
    /// exactly `shape` values of `dtype` (see [`QTensor::expected_bytes`]).
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        buf: Arc<Buffer>,
        range: Range<usize>,
    ) -> Self {
        debug_assert_eq!(range.len(), Self::expected_bytes(dtype, &shape));
        QTensor {
            name: name.into(),
            dtype,
            shape,
            buf,
            range,
        }
    }

    /// Builds an f32 tensor from values (used by tests and by converters).
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        QTensor::new(name, DType::F32, shape, Arc::new(Buffer::Owned(bytes)), 0..len)
    }

    /// Builds a tensor from raw bytes in `dtype` (e.g. quantised blocks).
    pub fn from_bytes(name: impl Into<String>, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        QTensor::new(name, dtype, shape, Arc::new(Buffer::Owned(bytes)), 0..len)
    }

    pub fn expected_bytes(dtype: DType, shape: &[usize]) -> usize {
        dtype.bytes_for(shape.iter().product())
    }

    /// The stored bytes; empty when the tensor is not resident (its buffer
    /// is [`Buffer::Deferred`]).
    pub fn bytes(&self) -> &[u8] {
        self.buf.bytes().get(self.range.clone()).unwrap_or(&[])
    }

    /// Whether the bytes are in memory. Only the GPU upload accepts tensors
    /// that are not: it writes them as they stream in.
    pub fn is_resident(&self) -> bool {
        !self.buf.is_deferred()
    }

    /// The byte range within the backing buffer (for a GGUF file: absolute
    /// file offsets), which is where a stream delivers a deferred tensor.
    pub fn byte_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// True when both tensors view the same bytes of the same buffer, as a
    /// head tied to the embedding does. Comparing pointers of `bytes()` would
    /// not work for deferred tensors, whose byte slices are all empty.
    pub fn same_storage(&self, other: &QTensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf) && self.range == other.range
    }

    /// The backing buffer, so that tensors from one stream can be recognised.
    pub(crate) fn storage(&self) -> &Arc<Buffer> {
        &self.buf
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of the last (contiguous) dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Product of all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.numel() / self.cols().max(1)
    }

    fn row_bytes(&self) -> usize {
        self.dtype.bytes_for(self.cols())
    }

    /// A view of `n` consecutive rows starting at `start` (rows counted over
    /// all leading dimensions). The view is 2-D: `[n, cols]`.
    pub fn rows_view(&self, start: usize, n: usize, name: impl Into<String>) -> QTensor {
        assert!(start + n <= self.rows(), "row view out of range for {}", self.name);
        let rb = self.row_bytes();
        let begin = self.range.start + start * rb;
        QTensor {
            name: name.into(),
            dtype: self.dtype,
            shape: vec![n, self.cols()],
            buf: self.buf.clone(),
            range: begin..begin + n * rb,
        }
    }

    /// The `i`-th slice along the first dimension of a 3-D tensor, as 2-D.
    pub fn index0(&self, i: usize, name: impl Into<String>) -> QTensor {
        assert_eq!(self.shape.len(), 3, "index0 needs a 3-D tensor: {}", self.name);
        let per = self.shape[1];
        self.rows_view(i * per, per, name)
    }

    /// Dequantises row `r` into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let bytes = &self.bytes()[r * rb..(r + 1) * rb];
        dequantize(self.dtype, bytes, out);
    }

    /// The whole tensor as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        dequantize(self.dtype, self.bytes(), &mut out);
        out
    }
}

/// A weight vector (a norm's scale or a bias): its f32 values for the CPU,
/// and the stored tensor they were read from, so that the GPU upload can
/// write it like any other weight, also when the tensor is streamed and
/// its values are not in memory (then `values` is empty).
#[derive(Clone, Debug)]
pub struct WeightVec {
    pub values: Vec<f32>,
    pub tensor: QTensor,
}

impl WeightVec {
    /// The vector stored in `tensor` (1-D); decoded now when it is resident.
    pub fn from_tensor(tensor: QTensor) -> WeightVec {
        let values = if tensor.is_resident() {
            tensor.to_f32()
        } else {
            Vec::new()
        };
        WeightVec { values, tensor }
    }

    /// A vector made from values (tests, converters), stored as F32.
    pub fn from_values(name: impl Into<String>, values: Vec<f32>) -> WeightVec {
        let tensor = QTensor::from_f32(name, vec![values.len()], &values);
        WeightVec { values, tensor }
    }
}

impl std::ops::Deref for WeightVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values
    }
}

/// Decodes `bytes` of `dtype` into `out`; `out.len()` values are produced.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        DType::Q4_0 => {
            // ggml: y[j] = (qs[j] & 0xF) - 8, y[j + 16] = (qs[j] >> 4) - 8.
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..QK / 2 {
                    let q = b[2 + j];
                    o[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                    o[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..QK / 2 {
                    let q = b[4 + j];
                    o[j] = d * (q & 0x0F) as f32 + m;
                    o[j + QK / 2] = d * (q >> 4) as f32 + m;
                }
            }
        }
        DType::Q5_0 => {
            // ggml: the fifth bit of value j is bit j of the u32 qh.
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(22)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..QK / 2 {
                    let lo = (b[6 + j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                    let hi = (b[6 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                    o[j] = d * (lo as i32 - 16) as f32;
                    o[j + QK / 2] = d * (hi as i32 - 16) as f32;
                }
            }
        }
        DType::Q5_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(24)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for j in 0..QK / 2 {
                    let lo = (b[8 + j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                    let hi = (b[8 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                    o[j] = d * lo as f32 + m;
                    o[j + QK / 2] = d * hi as f32 + m;
                }
            }
        }
        DType::Q2_K => {
            // Each 128-value half reads 32 bytes of qs four times, two bits at
            // a time; value i of the super-block uses scale byte i / 16.
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(84)) {
                let d = f16_at(b, 80);
                let dmin = f16_at(b, 82);
                for (i, v) in o.iter_mut().enumerate() {
                    let sc = b[i / 16];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    let (n, r) = (i / 128, i % 128);
                    let q = (b[16 + n * 32 + r % 32] >> (2 * (r / 32))) & 3;
                    *v = dl * q as f32 - ml;
                }
            }
        }
        DType::Q3_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(110)) {
                let d = f16_at(b, 108);
                let scales = q3_k_scales(&b[96..108]);
                for (i, v) in o.iter_mut().enumerate() {
                    let (n, r) = (i / 128, i % 128);
                    let lo = ((b[32 + n * 32 + r % 32] >> (2 * (r / 32))) & 3) as i32;
                    // A set mask bit means no offset; a clear one subtracts 4.
                    let hbit = (b[i % 32] >> (i / 32)) & 1;
                    let q = lo - if hbit == 1 { 0 } else { 4 };
                    *v = (d * scales[i / 16] as f32) * q as f32;
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            let bb = if five { 176 } else { 144 };
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let qs = if five { &b[48..176] } else { &b[16..144] };
                for j in 0..8 {
                    let (sc, m) = k_scale_min(&b[4..16], j);
                    let dl = d * sc as f32;
                    let ml = dmin * m as f32;
                    for l in 0..32 {
                        let mut q = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0x0F;
                        if five {
                            q |= ((b[16 + l] >> j) & 1) << 4;
                        }
                        o[j * 32 + l] = dl * q as f32 - ml;
                    }
                }
            }
        }
        DType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for (i, v) in o.iter_mut().enumerate() {
                    let (n, r) = (i / 128, i % 128);
                    let lo = (b[n * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
                    let hi = (b[128 + n * 32 + r % 32] >> (2 * (r / 32))) & 3;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    let sc = b[192 + i / 16] as i8;
                    *v = (d * sc as f32) * q as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block,
/// from its 12 packed bytes (ggml's `get_scale_min_k4`): sub-blocks 0..3 keep
/// theirs in the low six bits of bytes j and j + 4; 4..7 split theirs between
/// a nibble of byte j + 4 and the top two bits of bytes j - 4 and j.
pub fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 16 signed scales of a Q3_K super-block from its 12 packed bytes: the
/// low nibble of scale i is in byte i % 8 (low half for i < 8), its two high
/// bits in byte 8 + i % 4 at bit 2 * (i / 4); stored with an offset of 32.
pub fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// Quantises `values` (a multiple of the block size long) into `dtype`
/// blocks. The 32-value formats follow ggml's reference quantisers; the
/// K-quants use the simpler searches documented at [`affine_k`] and
/// [`symmetric_k`], whose blocks any ggml decoder reads. F32/F16/BF16 are
/// plain conversions.
pub fn quantize(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dtype.bytes_for(values.len()));
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values.iter().for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values.iter().for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => {
            for blk in values.chunks_exact(QK) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        DType::Q4_0 => {
            // ggml picks the value of largest magnitude (with its sign) as -8.
            for blk in values.chunks_exact(QK) {
                let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                }
            }
        }
        DType::Q4_1 => {
            for blk in values.chunks_exact(QK) {
                let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                }
            }
        }
        DType::Q5_0 => {
            // ggml's quantize_row_q5_0_ref: the value of largest magnitude
            // (with its sign) maps to -16.
            for blk in values.chunks_exact(QK) {
                let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = blk
                    .iter()
                    .map(|&v| ((v * id + 16.5) as i32).clamp(0, 31) as u8)
                    .collect();
                out.extend(f16::from_f32(d).to_le_bytes());
                push_q5(&mut out, &q);
            }
        }
        DType::Q5_1 => {
            for blk in values.chunks_exact(QK) {
                let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 31.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = blk
                    .iter()
                    .map(|&v| (((v - min) * id + 0.5) as i32).clamp(0, 31) as u8)
                    .collect();
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                push_q5(&mut out, &q);
            }
        }
        DType::Q2_K => {
            for blk in values.chunks_exact(QK_K) {
                let a = affine_k(blk, 16, 3, 15);
                out.extend(a.sc.iter().zip(&a.m).map(|(s, m)| s | (m << 4)));
                let mut qs = [0u8; 64];
                for (i, &q) in a.q.iter().enumerate() {
                    let (n, r) = (i / 128, i % 128);
                    qs[n * 32 + r % 32] |= q << (2 * (r / 32));
                }
                out.extend(qs);
                out.extend(f16::from_f32(a.d).to_le_bytes());
                out.extend(f16::from_f32(a.dmin).to_le_bytes());
            }
        }
        DType::Q3_K => {
            for blk in values.chunks_exact(QK_K) {
                let (d, sc, q) = symmetric_k(blk, 4, 32);
                let (mut hmask, mut qs, mut scales) = ([0u8; 32], [0u8; 64], [0u8; 12]);
                for (i, &q) in q.iter().enumerate() {
                    // Stored as L = q + 4 in 0..8: two low bits in qs, the
                    // third in the mask (set means "no -4 offset").
                    let l = (q + 4) as u8;
                    let (n, r) = (i / 128, i % 128);
                    qs[n * 32 + r % 32] |= (l & 3) << (2 * (r / 32));
                    hmask[i % 32] |= (l >> 2) << (i / 32);
                }
                for (i, &s) in sc.iter().enumerate() {
                    let u = (s as i32 + 32) as u8;
                    scales[i % 8] |= (u & 0x0F) << (4 * (i / 8));
                    scales[8 + i % 4] |= (u >> 4) << (2 * (i / 4));
                }
                out.extend(hmask);
                out.extend(qs);
                out.extend(scales);
                out.extend(f16::from_f32(d).to_le_bytes());
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            for blk in values.chunks_exact(QK_K) {
                let a = affine_k(blk, 32, if five { 31 } else { 15 }, 63);
                out.extend(f16::from_f32(a.d).to_le_bytes());
                out.extend(f16::from_f32(a.dmin).to_le_bytes());
                let mut scales = [0u8; 12];
                for j in 0..8 {
                    let (sc, m) = (a.sc[j], a.m[j]);
                    if j < 4 {
                        scales[j] |= sc;
                        scales[j + 4] |= m;
                    } else {
                        scales[j + 4] = (sc & 0x0F) | ((m & 0x0F) << 4);
                        scales[j - 4] |= (sc >> 4) << 6;
                        scales[j] |= (m >> 4) << 6;
                    }
                }
                out.extend(scales);
                let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
                for (i, &q) in a.q.iter().enumerate() {
                    let (j, l) = (i / 32, i % 32);
                    qs[(j / 2) * 32 + l] |= (q & 0x0F) << (4 * (j % 2));
                    qh[l] |= (q >> 4) << j;
                }
                if five {
                    out.extend(qh);
                }
                out.extend(qs);
            }
        }
        DType::Q6_K => {
            for blk in values.chunks_exact(QK_K) {
                let (d, sc, q) = symmetric_k(blk, 32, 128);
                let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
                for (i, &q) in q.iter().enumerate() {
                    let l = (q + 32) as u8;
                    let (n, r) = (i / 128, i % 128);
                    ql[n * 64 + r % 64] |= (l & 0x0F) << (4 * (r / 64));
                    qh[n * 32 + r % 32] |= (l >> 4) << (2 * (r / 32));
                }
                out.extend(ql);
                out.extend(qh);
                out.extend(sc.iter().map(|&s| s as u8));
                out.extend(f16::from_f32(d).to_le_bytes());
            }
        }
    }
    out
}

/// Appends the `qh` word and the nibbles of a Q5_0/Q5_1 block of 5-bit `q`.
fn push_q5(out: &mut Vec<u8>, q: &[u8]) {
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (((v >> 4) as u32) << j));
    out.extend(qh.to_le_bytes());
    for j in 0..QK / 2 {
        out.push((q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4));
    }
}

/// An affine K-quant super-block: f16-rounded `d`/`dmin`, per-sub-block
/// integer scales and mins, and the unsigned codes of the 256 values.
struct AffineK {
    d: f32,
    dmin: f32,
    sc: Vec<u8>,
    m: Vec<u8>,
    q: Vec<u8>,
}

/// Quantises a 256-value super-block as `x = d * sc * q - dmin * m` with
/// sub-blocks of `sub` values, codes in 0..=`nmax` and scales/mins in
/// 0..=`smax`. This is a simpler search than ggml's `make_qkx2_quants` (no
/// iterative refinement): each sub-block takes its range `[min(0, lo), hi]`,
/// and the integer scales and mins are rounded up so that the range stays
/// covered, which bounds the error by about one step of the sub-block.
fn affine_k(x: &[f32], sub: usize, nmax: u8, smax: u8) -> AffineK {
    let n = x.len() / sub;
    let mut scale = vec![0f32; n];
    let mut min = vec![0f32; n];
    for (j, c) in x.chunks_exact(sub).enumerate() {
        let lo = c.iter().copied().fold(0f32, f32::min);
        let hi = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[j] = (hi - lo) / nmax as f32;
        min[j] = -lo;
    }
    let max_scale = scale.iter().copied().fold(0f32, f32::max);
    let max_min = min.iter().copied().fold(0f32, f32::max);
    // Rounded to f16 first, because the decoder multiplies by the stored d.
    let d = f16::from_f32(max_scale / smax as f32).to_f32();
    let dmin = f16::from_f32(max_min / smax as f32).to_f32();
    let int = |v: f32, step: f32| {
        if step > 0.0 {
            (v / step).ceil().clamp(0.0, smax as f32) as u8
        } else {
            0
        }
    };
    let sc: Vec<u8> = scale.iter().map(|&s| int(s, d)).collect();
    let m: Vec<u8> = min.iter().map(|&v| int(v, dmin)).collect();
    let mut q = Vec::with_capacity(x.len());
    for (j, c) in x.chunks_exact(sub).enumerate() {
        let dl = d * sc[j] as f32;
        let ml = dmin * m[j] as f32;
        let id = if dl > 0.0 { 1.0 / dl } else { 0.0 };
        q.extend(c.iter().map(|&v| ((v + ml) * id).round().clamp(0.0, nmax as f32) as u8));
    }
    AffineK { d, dmin, sc, m, q }
}

/// Quantises a 256-value super-block as `x = d * sc * q` with 16-value
/// sub-blocks, codes in `-half..half` and signed scales in `-smax..smax`, as
/// ggml's Q3_K/Q6_K reference quantisers do but with the plain first guess of
/// `make_qx_quants` (the value of largest magnitude maps to `-half`) instead
/// of its search. Returns the f16-rounded `d`, the scales and the codes.
fn symmetric_k(x: &[f32], half: i32, smax: i32) -> (f32, Vec<i8>, Vec<i32>) {
    let signed_max = |c: &[f32]| c.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let scale: Vec<f32> = x.chunks_exact(16).map(|c| signed_max(c) / -(half as f32)).collect();
    let max_scale = signed_max(&scale);
    if max_scale == 0.0 {
        return (0.0, vec![0; scale.len()], vec![0; x.len()]);
    }
    let iscale = -(smax as f32) / max_scale;
    let d = f16::from_f32(1.0 / iscale).to_f32();
    let sc: Vec<i8> = scale
        .iter()
        .map(|&s| ((s / d).round() as i32).clamp(-smax, smax - 1) as i8)
        .collect();
    let mut q = Vec::with_capacity(x.len());
    for (j, c) in x.chunks_exact(16).enumerate() {
        let dl = d * sc[j] as f32;
        let id = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        q.extend(c.iter().map(|&v| ((v * id).round() as i32).clamp(-half, half - 1)));
    }
    (d, sc, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantize_roundtrip_error_is_bounded_per_format() {
        let x = seeded(256 * 8, 7);
        // Values are in [-1, 1]. Worst-case error per format is half a
        // quantisation step of the block, or one step where the value of
        // largest magnitude sets the scale and the opposite end clamps
        // (Q4_0, Q5_0, Q3_K, Q6_K). For the K-quants the step is that of
        // the integer sub-block scale, which the scale rounding (to 4 or 6
        // bits, and d to f16) can enlarge by a few per cent; the affine
        // K-quants (Q2_K, Q4_K, Q5_K) round scales and mins up, adding at
        // most one `dmin` (max min / 63 or / 15) to half a step.
        for (dt, bound) in [
            (DType::F32, 0.0),
            (DType::F16, 1e-3),
            (DType::BF16, 8e-3),
            (DType::Q8_0, 1.0 / 127.0 / 2.0 + 1e-3),
            (DType::Q4_1, 2.0 / 15.0 / 2.0 + 2e-3),
            (DType::Q4_0, 1.0 / 8.0 + 2e-3),
            (DType::Q5_0, 1.0 / 16.0 + 2e-3),
            (DType::Q5_1, 2.0 / 31.0 / 2.0 + 2e-3),
            (DType::Q2_K, 2.0 / 3.0 * 0.55 + 1.0 / 15.0),
            (DType::Q3_K, 1.0 / 4.0 * 1.1),
            (DType::Q4_K, 2.0 / 15.0 * 0.55 + 1.0 / 63.0),
            (DType::Q5_K, 2.0 / 31.0 * 0.55 + 1.0 / 63.0),
            (DType::Q6_K, 1.0 / 32.0 * 1.1),
        ] {
            let q = quantize(dt, &x);
            assert_eq!(q.len(), dt.bytes_for(x.len()), "{dt} byte count");
            let mut y = vec![0.0; x.len()];
            dequantize(dt, &q, &mut y);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= bound, "{dt}: index {i}: {a} vs {b}");
            }
        }
    }

    /// Decodes the random blocks of `models/fixtures/quants/blocks.safetensors`
    /// (see `models/make_quant_fixtures.py`) and compares with gguf-py's
    /// NumPy transcription of ggml's `dequantize_row_*`.
    #[test]
    fn dequantize_matches_gguf_py_fixture() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/quants/blocks.safetensors");
        let file = std::fs::read(&path).expect("read the quant fixture");
        let st = safetensors::SafeTensors::deserialize(&file).expect("parse the quant fixture");
        let quantized: Vec<DType> = DType::ALL.into_iter().filter(|d| d.is_quantized()).collect();
        for dt in quantized {
            let bytes = st.tensor(&format!("{dt}.bytes")).expect("fixture bytes");
            let values = st.tensor(&format!("{dt}.values")).expect("fixture values");
            let (bv, bb) = dt.block();
            assert_eq!(bytes.shape()[1], bb, "{dt}: bytes per block");
            assert_eq!(values.shape()[1], bv, "{dt}: values per block");
            let want: Vec<f32> = values
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut got = vec![f32::NAN; want.len()];
            dequantize(dt, bytes.data(), &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs(),
                    "{dt}: value {i} (block {}, index {}): lynx {g} vs gguf-py {w}",
                    i / bv,
                    i % bv
                );
            }
        }
    }

    #[test]
    fn k_quant_rows_need_whole_super_blocks() {
        for dt in [DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K] {
            assert!(dt.fits_cols(512), "{dt}: 512 columns");
            assert!(!dt.fits_cols(32), "{dt}: 32 columns");
        }
        assert!(DType::Q5_0.fits_cols(32) && !DType::Q5_0.fits_cols(48));
    }

    #[test]
    fn q4_0_block_layout_matches_ggml() {
        // d = 1.0, nibbles: low half holds j, high half holds 15 - j.
        let mut blk = f16::from_f32(1.0).to_le_bytes().to_vec();
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = vec![0.0; 32];
        dequantize(DType::Q4_0, &blk, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 - 8.0, "low nibble {j}");
            assert_eq!(y[j + 16], (15 - j) as f32 - 8.0, "high nibble {j}");
        }
    }

    #[test]
    fn views_select_rows_and_experts() {
        let vals: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect();
        let t = QTensor::from_f32("w", vec![2, 3, 4], &vals);
        let e1 = t.index0(1, "w[1]");
        assert_eq!(e1.shape, vec![3, 4]);
        assert_eq!(e1.to_f32(), vals[12..24].to_vec());
        let r = e1.rows_view(1, 2, "w[1][1..3]");
        assert_eq!(r.to_f32(), vals[16..24].to_vec());
    }
}
