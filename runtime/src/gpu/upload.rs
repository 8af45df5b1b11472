//! Writing weights into GPU buffers: from memory, or from a byte stream.
//!
//! Every weight buffer (a matrix chunk, a group of experts, a norm) is
//! created empty and then filled by appending byte ranges of stored tensors,
//! in order, through `queue.write_buffer`. A tensor that is in memory (a
//! memory map natively, or an owned buffer) is written at once; a tensor
//! whose bytes are not in memory ([`crate::tensor::Buffer::Deferred`]: the
//! browser streams the GGUF file) becomes a *segment*: a range of stream
//! offsets that [`WeightStream::feed`] writes as the chunks that hold it
//! arrive, so only the chunk in hand is ever in wasm memory. Both cases run
//! the same append and conversion code, which is the only code that writes
//! weights to the GPU.
//!
//! `write_buffer` needs 4-byte aligned offsets and sizes, while tensors and
//! stream chunks have any length (a Q4_0 row of 32 values is 18 bytes), so
//! each buffer keeps the at most 3 bytes that do not yet fill a word and
//! writes them with the next append; the last word is padded with zeros,
//! which the buffer has room for (sizes round up to 16 bytes).
//!
//! [`GgufStreamLoad`] puts it together for a GGUF arriving in chunks: it
//! buffers the header until it parses, builds the model description with the
//! same `arch::build` as a file on disk (its tensors deferred), allocates
//! every GPU buffer with [`GpuModel::create`], and feeds each later chunk
//! straight to the buffers.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use crate::arch::{GgufSource, config_from_gguf};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gpu::context::GpuContext;
use crate::gpu::engine::GpuModel;
use crate::tensor::{Buffer, DType, QTensor, dequantize};
use crate::tokenizer::Tokenizer;

/// How stored bytes become GPU bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Convert {
    /// The GPU keeps the stored format (F32, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    /// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).
    Copy,
    /// F16/BF16 widened to F32 (kernels for the half formats can come later).
    Widen(DType),
}

impl Convert {
    /// The conversion for a tensor stored as `dtype` that the GPU holds as `gpu`.
    pub(crate) fn between(dtype: DType, gpu: DType) -> Convert {
        if dtype == gpu {
            Convert::Copy
        } else {
            Convert::Widen(dtype)
        }
    }
}

/// One byte range of a stored tensor, appended to a weight buffer.
pub(crate) struct Part<'a> {
    pub tensor: &'a QTensor,
    /// Byte range within the tensor's own bytes.
    pub bytes: Range<usize>,
    pub convert: Convert,
}

/// A weight buffer being filled front to back.
struct BufferFill {
    buffer: wgpu::Buffer,
    label: String,
    /// Buffer size, to check that the zero-padded last word fits.
    size: u64,
    /// Offset of the first byte in `pending` (always a multiple of 4).
    at: u64,
    /// Up to 3 bytes that do not fill a word yet.
    pending: Vec<u8>,
    /// Bytes appended so far, and the bytes all its parts will append.
    appended: u64,
    expected: u64,
}

impl BufferFill {
    fn append(&mut self, queue: &wgpu::Queue, mut data: &[u8]) {
        self.appended += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (4 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < 4 {
                return;
            }
            queue.write_buffer(&self.buffer, self.at, &self.pending);
            self.at += 4;
            self.pending.clear();
        }
        let whole = data.len() / 4 * 4;
        if whole > 0 {
            queue.write_buffer(&self.buffer, self.at, &data[..whole]);
            self.at += whole as u64;
        }
        self.pending.extend_from_slice(&data[whole..]);
    }

    /// Writes the last partial word, zero-padded, and checks the buffer got
    /// every byte it was planned to get.
    fn finish(&mut self, queue: &wgpu::Queue) -> Result<()> {
        if self.appended != self.expected {
            return Err(Error::Gpu(format!(
                "weight buffer `{}` received {} of its {} bytes",
                self.label, self.appended, self.expected
            )));
        }
        if !self.pending.is_empty() {
            if self.at + 4 > self.size {
                return Err(Error::Gpu(format!(
                    "weight buffer `{}`: no room for its last padded word",
                    self.label
                )));
            }
            self.pending.resize(4, 0);
            queue.write_buffer(&self.buffer, self.at, &self.pending);
            self.at += 4;
            self.pending.clear();
        }
        Ok(())
    }
}

/// Converts stored bytes (any length) and appends them to a buffer. A
/// widened tensor may be split inside a 2-byte value; its odd byte waits in
/// `carry` for the next piece.
fn convert_append(queue: &wgpu::Queue, fill: &mut BufferFill, convert: Convert, carry: &mut Vec<u8>, data: &[u8]) {
    match convert {
        Convert::Copy => fill.append(queue, data),
        Convert::Widen(dtype) => {
            // Convert in pieces, so that a large tensor in memory does not
            // need a second, twice-as-large copy of itself.
            const PIECE: usize = 1 << 16;
            let mut data = data;
            if !carry.is_empty() && !data.is_empty() {
                carry.push(data[0]);
                data = &data[1..];
                let mut f = [0f32; 1];
                dequantize(dtype, carry, &mut f);
                fill.append(queue, bytemuck::cast_slice(&f));
                carry.clear();
            }
            let even = data.len() / 2 * 2;
            let mut f = Vec::new();
            for piece in data[..even].chunks(PIECE) {
                f.resize(piece.len() / 2, 0f32);
                dequantize(dtype, piece, &mut f);
                fill.append(queue, bytemuck::cast_slice(&f));
            }
            carry.extend_from_slice(&data[even..]);
        }
    }
}

/// A deferred part: stream offsets `src` go to buffer `fill`.
struct Segment {
    name: String,
    src: Range<usize>,
    /// Bytes of `src` written so far.
    done: usize,
    fill: usize,
    convert: Convert,
    carry: Vec<u8>,
}

/// The weight buffers of one upload, and the parts still to be streamed.
/// Made by [`GpuModel::create`] (and by the matrix uploads of tests);
/// becomes a [`WeightStream`] once every buffer exists.
#[derive(Default)]
pub(crate) struct WeightUpload {
    fills: Vec<BufferFill>,
    segments: Vec<Segment>,
    /// The deferred buffer that all streamed tensors view.
    stream: Option<Arc<Buffer>>,
}

impl WeightUpload {
    /// Creates a weight buffer of `size` bytes (zero-filled; `uniform` adds
    /// the UNIFORM usage that f32 vectors have) and appends `parts` to it in
    /// order: resident parts now, deferred parts when the stream brings them.
    pub(crate) fn buffer(
        &mut self,
        ctx: &GpuContext,
        label: &str,
        size: u64,
        uniform: bool,
        parts: &[Part<'_>],
    ) -> Result<wgpu::Buffer> {
        let expected: u64 = parts
            .iter()
            .map(|p| match p.convert {
                Convert::Copy => p.bytes.len() as u64,
                Convert::Widen(_) => p.bytes.len() as u64 * 2,
            })
            .sum();
        if expected > size {
            return Err(Error::Gpu(format!(
                "weight buffer `{label}`: {expected} bytes of weights do not fit its {size} bytes"
            )));
        }
        let buffer = ctx.weight_buffer(label, size, uniform)?;
        let fill = self.fills.len();
        self.fills.push(BufferFill {
            buffer: buffer.clone(),
            label: label.to_string(),
            size: size.max(16).div_ceil(16) * 16,
            at: 0,
            pending: Vec::new(),
            appended: 0,
            expected,
        });
        let mut deferred = false;
        for p in parts {
            let t = p.tensor;
            if p.bytes.end > t.byte_range().len() {
                return Err(Error::Gpu(format!(
                    "weight buffer `{label}`: bytes {:?} are outside tensor `{}`",
                    p.bytes, t.name
                )));
            }
            if t.is_resident() {
                if deferred {
                    // Parts append in order, so a resident part cannot follow
                    // one that is still to come. One model never mixes both.
                    return Err(Error::Gpu(format!(
                        "weight buffer `{label}`: tensor `{}` is in memory but an earlier part is streamed",
                        t.name
                    )));
                }
                let mut carry = Vec::new();
                let f = &mut self.fills[fill];
                convert_append(ctx.queue(), f, p.convert, &mut carry, &t.bytes()[p.bytes.clone()]);
                if !carry.is_empty() {
                    return Err(Error::Gpu(format!(
                        "tensor `{}`: an odd number of bytes of {:?} values",
                        t.name, p.convert
                    )));
                }
            } else {
                deferred = true;
                match &self.stream {
                    None => self.stream = Some(t.storage().clone()),
                    Some(s) if Arc::ptr_eq(s, t.storage()) => {}
                    Some(_) => {
                        return Err(Error::Gpu(format!(
                            "tensor `{}` comes from a second stream; one upload takes one stream",
                            t.name
                        )));
                    }
                }
                let base = t.byte_range().start;
                self.segments.push(Segment {
                    name: t.name.clone(),
                    src: base + p.bytes.start..base + p.bytes.end,
                    done: 0,
                    fill,
                    convert: p.convert,
                    carry: Vec::new(),
                });
            }
        }
        Ok(buffer)
    }

    /// Finishes an upload whose parts were all in memory.
    pub(crate) fn finish_resident(mut self, ctx: &GpuContext) -> Result<()> {
        if let Some(s) = self.segments.first() {
            return Err(Error::Gpu(format!(
                "tensor `{}` is not in memory; it can only be uploaded from its stream",
                s.name
            )));
        }
        for f in &mut self.fills {
            f.finish(ctx.queue())?;
        }
        Ok(())
    }

    /// The stream that takes the deferred parts, in stream order.
    pub(crate) fn into_stream(mut self, ctx: Arc<GpuContext>) -> Result<WeightStream> {
        self.segments.sort_by_key(|s| s.src.start);
        // Each buffer is filled front to back, so its parts must come in the
        // order of their stream offsets; true for every GGUF tensor (a
        // tensor's bytes are contiguous, and stacked experts are in order).
        let mut last_end: Vec<Option<(usize, &str)>> = vec![None; self.fills.len()];
        for s in &self.segments {
            if let Some((end, prev)) = last_end[s.fill]
                && s.src.start < end
            {
                return Err(Error::Gpu(format!(
                    "weight buffer `{}`: tensor `{}` comes before `{prev}` in the stream; it cannot be streamed",
                    self.fills[s.fill].label, s.name
                )));
            }
            last_end[s.fill] = Some((s.src.end, &s.name));
        }
        let total = self.stream.as_ref().map_or(0, |b| b.len());
        Ok(WeightStream {
            ctx,
            fills: self.fills,
            segments: self.segments,
            next: 0,
            pos: 0,
            total,
        })
    }
}

/// Writes the streamed weights of an upload as their bytes arrive: feed it
/// the stream's chunks in order, from offset 0 (bytes that belong to no
/// tensor, such as a GGUF header, are skipped), then [`WeightStream::finish`].
pub struct WeightStream {
    ctx: Arc<GpuContext>,
    fills: Vec<BufferFill>,
    /// Sorted by start offset.
    segments: Vec<Segment>,
    /// Segments before this one are complete.
    next: usize,
    /// Stream bytes received.
    pos: usize,
    /// Length of the stream (0 when nothing is streamed).
    total: usize,
}

impl WeightStream {
    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.pos
    }

    /// Length of the whole stream.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Writes the parts of the next `chunk` of the stream that belong to a
    /// weight. Only the chunk itself is held, and only while this runs.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        let (start, end) = (self.pos, self.pos + chunk.len());
        let queue = self.ctx.queue().clone();
        let mut i = self.next;
        while i < self.segments.len() && self.segments[i].src.start < end {
            let seg = &mut self.segments[i];
            let from = seg.src.start + seg.done;
            if from < seg.src.end {
                // Chunks arrive in order and every chunk serves every segment
                // it overlaps, so the next byte a segment needs is never
                // before this chunk.
                debug_assert!(from >= start);
                let to = seg.src.end.min(end);
                if from < to {
                    let fill = &mut self.fills[seg.fill];
                    convert_append(
                        &queue,
                        fill,
                        seg.convert,
                        &mut seg.carry,
                        &chunk[from - start..to - start],
                    );
                    seg.done += to - from;
                }
            }
            i += 1;
        }
        while self.next < self.segments.len() {
            let s = &self.segments[self.next];
            if s.done < s.src.len() {
                break;
            }
            self.next += 1;
        }
        self.pos = end;
        Ok(())
    }

    /// Checks that every weight got all its bytes, writes the last padded
    /// words, and waits for the writes (natively; the browser orders them
    /// before any later submission anyway).
    pub fn finish(mut self) -> Result<()> {
        if let Some(s) = self.segments.iter().find(|s| s.done < s.src.len()) {
            return Err(Error::Gpu(format!(
                "the stream ended after {} of {} bytes, before the end of tensor `{}` (bytes {}..{})",
                self.pos, self.total, s.name, s.src.start, s.src.end
            )));
        }
        if let Some(s) = self.segments.iter().find(|s| !s.carry.is_empty()) {
            return Err(Error::Gpu(format!(
                "tensor `{}`: an odd number of bytes of {:?} values",
                s.name, s.convert
            )));
        }
        let queue = self.ctx.queue().clone();
        for f in &mut self.fills {
            f.finish(&queue)?;
        }
        self.ctx.wait()
    }
}

/// Loads a GGUF model onto the GPU from a byte stream (the browser's fetch
/// body or a picked file), without ever holding the file in memory: the
/// header is buffered until it parses (a few MiB for the demo model, most of
/// it the tokenizer), then every chunk goes straight to the GPU buffers.
pub struct GgufStreamLoad {
    ctx: Arc<GpuContext>,
    name: String,
    total: usize,
    state: LoadState,
}

// One per load, so the size difference between the states costs nothing.
#[allow(clippy::large_enum_variant)]
enum LoadState {
    /// Collecting the header; the next parse attempt waits for `try_at` bytes.
    Header { bytes: Vec<u8>, try_at: usize },
    Weights {
        model: Box<GpuModel>,
        tokenizer: Option<Tokenizer>,
        stream: WeightStream,
    },
}

/// The first header parse waits for this many bytes, and each failed
/// attempt doubles it, so parsing costs O(header) in all.
const FIRST_HEADER_TRY: usize = 1 << 20;
/// A larger header is refused: real headers are a few MiB (tokenizers).
const MAX_HEADER: usize = 256 << 20;

impl GgufStreamLoad {
    /// A load of `total` bytes named `name` (for messages).
    pub fn new(ctx: Arc<GpuContext>, name: &str, total: usize) -> GgufStreamLoad {
        GgufStreamLoad {
            ctx,
            name: name.to_string(),
            total,
            state: LoadState::Header {
                bytes: Vec::new(),
                try_at: FIRST_HEADER_TRY.min(total),
            },
        }
    }

    /// Takes the next chunk of the file.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        match &mut self.state {
            LoadState::Weights { stream, .. } => return stream.feed(chunk),
            LoadState::Header { bytes, try_at } => {
                bytes.extend_from_slice(chunk);
                if bytes.len() > self.total {
                    return Err(Error::Format {
                        path: PathBuf::from(&self.name),
                        format: "GGUF",
                        reason: format!("the stream holds more than the {} bytes announced", self.total),
                    });
                }
                if bytes.len() < *try_at {
                    return Ok(());
                }
                let path = PathBuf::from(&self.name);
                let Some(file) = GgufFile::from_header(path.clone(), bytes, self.total)? else {
                    if bytes.len() >= MAX_HEADER {
                        return Err(Error::Format {
                            path,
                            format: "GGUF",
                            reason: format!("no complete header in the first {MAX_HEADER} bytes"),
                        });
                    }
                    *try_at = (*try_at * 2).min(self.total);
                    return Ok(());
                };
                let header = std::mem::take(bytes);
                let config = config_from_gguf(&file)?;
                let tokenizer = Tokenizer::from_gguf(&file)?;
                // The same builder as for a file on disk; its tensors are
                // deferred, so this only describes the weights.
                let described = crate::loader::build_checked(
                    config,
                    &GgufSource { file: &file },
                    crate::config::ConfigSource::Gguf,
                )?;
                let (model, mut stream) = GpuModel::create(self.ctx.clone(), &described, |_, _| {})?;
                // The header buffer may already hold the first tensors.
                stream.feed(&header)?;
                self.state = LoadState::Weights {
                    model: Box::new(model),
                    tokenizer,
                    stream,
                };
            }
        }
        Ok(())
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        match &self.state {
            LoadState::Header { bytes, .. } => bytes.len(),
            LoadState::Weights { stream, .. } => stream.received(),
        }
    }

    /// The model, once the stream has ended; fails when it ended early.
    pub fn finish(self) -> Result<(GpuModel, Option<Tokenizer>)> {
        match self.state {
            // Parsing is tried at the latest when all `total` bytes are in,
            // so a load still in this state ended early.
            LoadState::Header { bytes, .. } => Err(Error::Format {
                path: PathBuf::from(&self.name),
                format: "GGUF",
                reason: format!(
                    "the stream ended after {} of {} bytes, inside the header",
                    bytes.len(),
                    self.total
                ),
            }),
            LoadState::Weights {
                model,
                tokenizer,
                stream,
            } => {
                if stream.received() != self.total {
                    return Err(Error::Format {
                        path: PathBuf::from(&self.name),
                        format: "GGUF",
                        reason: format!("the stream ended after {} of {} bytes", stream.received(), self.total),
                    });
                }
                stream.finish()?;
                Ok((*model, tokenizer))
            }
        }
    }
}
