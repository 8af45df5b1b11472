//! `GpuMatrix`: a weight matrix on the GPU in its stored format.
//!
//! Quantised formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K ..
//! Q6_K) keep their GGUF block bytes (packed into u32 words, so kernels
//! decode them as `tensor::dequantize` does); F32 stays F32;
//! F16/BF16 are widened to F32 on upload for now (kernels for them can come
//! later). A storage binding may hold at most `max_storage_buffer_binding_size`
//! bytes (128 MiB on lavapipe, often 2-4 GiB on GPUs), so a large matrix is
//! split by rows into chunks, each its own buffer; kernels dispatch once per
//! chunk.

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::upload::{Convert, Part, WeightUpload};
use crate::tensor::{DType, QTensor};

/// Chunks hold a multiple of this many rows: the matmul kernel's workgroup
/// covers this many rows, so no workgroup straddles two chunks.
pub const ROW_TILE: usize = 64;

/// Bytes added after a chunk's rows: decoders read the word after a field
/// (see `dequant_common.wgsl`), which must exist even for the last block.
const SPARE_BYTES: usize = 4;

/// Consecutive rows `[row0, row0 + rows)` of a matrix in one buffer.
#[derive(Debug)]
pub struct WeightChunk {
    pub(crate) buffer: wgpu::Buffer,
    pub row0: usize,
    pub rows: usize,
}

#[derive(Debug)]
pub struct GpuMatrix {
    pub name: String,
    /// Rows (out features); all leading dimensions of the tensor flattened.
    pub rows: usize,
    /// Columns (in features): the contiguous dimension.
    pub cols: usize,
    /// Format of the bytes on the GPU: the stored format, except that
    /// F16/BF16 tensors are held as F32.
    pub dtype: DType,
    /// Bytes per row on the GPU.
    pub row_bytes: usize,
    pub(crate) chunks: Vec<WeightChunk>,
}

impl GpuMatrix {
    /// Uploads `t` (in memory), split into chunks that each fit one storage binding.
    pub fn upload(ctx: &GpuContext, t: &QTensor) -> Result<GpuMatrix> {
        Self::upload_with_chunk_limit(ctx, t, ctx.max_binding_bytes())
    }

    /// Uploads `t` in chunks of at most `max_chunk_bytes` bytes (capped at the
    /// device's binding limit). Tests use a tiny limit to exercise splitting.
    pub fn upload_with_chunk_limit(ctx: &GpuContext, t: &QTensor, max_chunk_bytes: u64) -> Result<GpuMatrix> {
        let mut up = WeightUpload::default();
        let m = Self::create(ctx, t, &mut up, max_chunk_bytes)?;
        up.finish_resident(ctx)?;
        Ok(m)
    }

    /// Creates the chunk buffers of `t` and hands its rows to `up`, which
    /// writes them now (`t` in memory) or as they stream in.
    pub(crate) fn create(
        ctx: &GpuContext,
        t: &QTensor,
        up: &mut WeightUpload,
        max_chunk_bytes: u64,
    ) -> Result<GpuMatrix> {
        let (rows, cols) = (t.rows(), t.cols());
        if rows == 0 || cols == 0 {
            return Err(Error::InvalidArgument(format!(
                "GpuMatrix `{}`: empty shape {:?}",
                t.name, t.shape
            )));
        }
        let dtype = match t.dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        if dtype.is_quantized() && !dtype.fits_cols(cols) {
            return Err(Error::InvalidArgument(format!(
                "GpuMatrix `{}`: {} rows of {cols} values are not whole blocks of {}",
                t.name,
                dtype,
                dtype.block().0
            )));
        }
        let row_bytes = dtype.bytes_for(cols);
        // The adapter's own limit (the browser's is often 128 MiB), never a
        // fixed size: `max_binding_bytes` reads the device limits.
        let limit = max_chunk_bytes.min(ctx.max_binding_bytes()) as usize;
        let fit = limit.saturating_sub(SPARE_BYTES + 3) / row_bytes;
        let rows_per_chunk = if fit >= rows { rows } else { fit / ROW_TILE * ROW_TILE };
        if rows_per_chunk == 0 {
            return Err(Error::Gpu(format!(
                "GpuMatrix `{}`: {ROW_TILE} rows of {row_bytes} bytes do not fit one storage binding of {limit} bytes",
                t.name
            )));
        }
        // Row offsets inside a chunk are u32 in the shaders.
        let chunk_bytes = rows_per_chunk * row_bytes + SPARE_BYTES;
        if chunk_bytes > u32::MAX as usize {
            return Err(Error::Gpu(format!(
                "GpuMatrix `{}`: a chunk of {chunk_bytes} bytes is too big",
                t.name
            )));
        }

        let src_row_bytes = t.dtype.bytes_for(cols);
        let convert = Convert::between(t.dtype, dtype);
        let mut chunks = Vec::with_capacity(rows.div_ceil(rows_per_chunk));
        let mut row0 = 0;
        while row0 < rows {
            let n = rows_per_chunk.min(rows - row0);
            let label = format!("{} rows {row0}..{} ({dtype})", t.name, row0 + n);
            // The spare bytes after the rows stay zero.
            let part = Part {
                tensor: t,
                bytes: row0 * src_row_bytes..(row0 + n) * src_row_bytes,
                convert,
            };
            let buffer = up.buffer(ctx, &label, (n * row_bytes + SPARE_BYTES) as u64, false, &[part])?;
            chunks.push(WeightChunk { buffer, row0, rows: n });
            row0 += n;
        }
        Ok(GpuMatrix {
            name: t.name.clone(),
            rows,
            cols,
            dtype,
            row_bytes,
            chunks,
        })
    }

    /// `(first row, rows)` of each chunk.
    pub fn chunk_rows(&self) -> Vec<(usize, usize)> {
        self.chunks.iter().map(|c| (c.row0, c.rows)).collect()
    }

    /// Bytes of weight data on the GPU (without padding): what one matmul reads.
    pub fn data_bytes(&self) -> u64 {
        (self.rows * self.row_bytes) as u64
    }

    /// The shader file that decodes this matrix's format.
    pub(crate) fn dequant_shader(&self) -> Result<&'static str> {
        dequant_shader_for(self.dtype)
            .ok_or_else(|| Error::Gpu(format!("GpuMatrix `{}`: no GPU decoder for {}", self.name, self.dtype)))
    }
}

/// The decoder file (`shaders/dequant_<format>.wgsl`) for a GPU-side weight
/// format, shared by dense matrices and stacked experts; `None` for F16/BF16,
/// which are widened to F32 on upload.
pub(crate) fn dequant_shader_for(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "dequant_f32.wgsl",
        DType::Q8_0 => "dequant_q8_0.wgsl",
        DType::Q4_0 => "dequant_q4_0.wgsl",
        DType::Q4_1 => "dequant_q4_1.wgsl",
        DType::Q5_0 => "dequant_q5_0.wgsl",
        DType::Q5_1 => "dequant_q5_1.wgsl",
        DType::Q2_K => "dequant_q2_k.wgsl",
        DType::Q3_K => "dequant_q3_k.wgsl",
        DType::Q4_K => "dequant_q4_k.wgsl",
        DType::Q5_K => "dequant_q5_k.wgsl",
        DType::Q6_K => "dequant_q6_k.wgsl",
        DType::F16 | DType::BF16 => return None,
    })
}
