//! `QTensor`: a weight tensor in its stored dtype or quant format, and the
//! scalar dequantisation routines that define what each format means.
//!
//! Shapes are in PyTorch order (`[rows, cols]` = `[out_features, in_features]`
//! for a linear weight); the last dimension is contiguous. Quantised formats
//! are GGUF-compatible blocks of 32 values along the last dimension.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};

/// Element type or block-quantisation format of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
}

/// Number of values in one quantisation block.
pub const QK: usize = 32;

impl DType {
    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q8_0 => (QK, 2 + QK),
            DType::Q4_0 => (QK, 2 + QK / 2),
            DType::Q4_1 => (QK, 4 + QK / 2),
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

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
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
    }
}

/// Quantises `values` (a multiple of 32 long) into `dtype` blocks, the way
/// ggml's reference quantisers do. F32/F16/BF16 are plain conversions.
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
    }
    out
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
        let x = seeded(32 * 64, 7);
        // Worst-case error per format is half a quantisation step of the block.
        for (dt, bound) in [
            (DType::F32, 0.0),
            (DType::F16, 1e-3),
            (DType::BF16, 8e-3),
            (DType::Q8_0, 1.0 / 127.0 / 2.0 + 1e-3),
            (DType::Q4_1, 2.0 / 15.0 / 2.0 + 2e-3),
            (DType::Q4_0, 1.0 / 8.0 + 2e-3),
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
