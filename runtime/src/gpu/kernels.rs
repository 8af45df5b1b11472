//! Host side of each kernel: one function per WGSL file. Each owns its
//! bind-group layout, checks shapes (returning `Err`, never panicking) and
//! records its dispatches into a [`GpuEncoder`]. Nothing runs until the
//! encoder is submitted with [`GpuContext::submit`].
//!
//! Dimension letters: T tokens, C in features / hidden size, N out features,
//! H heads, D head dim, V vocabulary, R rows, L row length.

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::config::RopeStyle;
use crate::error::{Error, Result};
use crate::gpu::context::{Elem, GpuContext, GpuEncoder, GpuTensor};
use crate::gpu::pipelines::{Bind, ShaderSpec};
use crate::gpu::weights::{GpuMatrix, ROW_TILE};

/// Workgroup size of the elementwise kernels (embed, rope, silu_mul, add).
pub(crate) const ELEMENTWISE_WG: usize = 256;

pub(crate) fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// A small uniform buffer holding a kernel's parameters.
pub(crate) fn params<P: Pod>(ctx: &GpuContext, label: &str, p: &P) -> wgpu::Buffer {
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(p),
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

pub(crate) fn whole(buffer: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: None,
    }
}

/// Checks that `t` is an f32 (or u32) tensor that one storage binding can hold.
pub(crate) fn check_tensor(ctx: &GpuContext, op: &str, what: &str, t: &GpuTensor, elem: Elem) -> Result<()> {
    if t.elem != elem {
        return Err(invalid(format!("{op}: `{what}` must be {elem:?}, is {:?}", t.elem)));
    }
    if t.numel() == 0 {
        return Err(invalid(format!("{op}: `{what}` is empty (shape {:?})", t.shape)));
    }
    if t.data_bytes() > ctx.max_binding_bytes() {
        return Err(Error::Gpu(format!(
            "{op}: `{what}` ({} bytes) exceeds this device's storage binding limit of {} bytes",
            t.data_bytes(),
            ctx.max_binding_bytes()
        )));
    }
    if t.numel() > u32::MAX as usize {
        return Err(invalid(format!("{op}: `{what}` has more than 2^32 values")));
    }
    Ok(())
}

/// Splits `groups` workgroups into a grid whose dimensions stay within the
/// device limit (65535 on most adapters): x first, the rest along y.
pub(crate) fn grid_2d(ctx: &GpuContext, op: &str, groups: usize) -> Result<[u32; 3]> {
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let x = groups.clamp(1, max);
    let y = groups.div_ceil(x).max(1);
    if y > max {
        return Err(invalid(format!(
            "{op}: {groups} workgroups exceed a {max} x {max} grid"
        )));
    }
    Ok([x as u32, y as u32, 1])
}

// ---------------------------------------------------------------------------
// matmul_nt_wq.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatmulParams {
    t: u32,
    c: u32,
    n: u32,
    row0: u32,
    rows: u32,
    row_bytes: u32,
    has_bias: u32,
    groups_x: u32,
    t_base: u32,
    _pad: [u32; 3],
}

/// At most this many bytes of activations are bound as a uniform in the
/// matmul: 64 KiB, the uniform binding limit of most devices and of WebGPU.
const MATMUL_UNIFORM_X_BYTES: u64 = 64 << 10;

/// Tokens per invocation (the kernel's TILE_T, at most 4) for a window of
/// T tokens: small tiles for decode, so a GEMV does not compute (and
/// discard) phantom tokens.
pub fn matmul_tile_t(t: usize) -> u32 {
    match t {
        1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// How the matmul reads its activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum XMode {
    /// All T tokens in one storage binding, one dispatch per weight chunk.
    Storage,
    /// Windows of `window` tokens, each bound as a uniform (see
    /// matmul_x_uniform.wgsl), one dispatch per window and weight chunk.
    Uniform { window: usize },
}

/// Uniform windows when a window of at least one token fits the uniform
/// limit and, if there is more than one window, windows start at offsets
/// the device accepts; otherwise storage.
fn matmul_x_mode(ctx: &GpuContext, t: usize, c: usize, allow_uniform: bool) -> XMode {
    let row_bytes = c as u64 * 4;
    let cap = MATMUL_UNIFORM_X_BYTES.min(ctx.limits().max_uniform_buffer_binding_size) / row_bytes;
    let align = ctx.limits().min_uniform_buffer_offset_alignment as u64;
    if !allow_uniform || !c.is_multiple_of(4) || cap == 0 {
        return XMode::Storage;
    }
    if t as u64 <= cap {
        return XMode::Uniform { window: t };
    }
    if !row_bytes.is_multiple_of(align) {
        return XMode::Storage;
    }
    // Whole tiles of 4 tokens per window when they fit.
    let window = if cap >= 4 { cap / 4 * 4 } else { cap };
    XMode::Uniform {
        window: window as usize,
    }
}

/// `y (T, N) = x (T, C) · Wᵀ + bias` with `w` (N, C) in its stored format.
/// `x` and `y` may have any shape whose last dimension is C (resp. N).
/// One dispatch per weight chunk and token window; each writes its block of `y`.
pub fn matmul_nt(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    x: &GpuTensor,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
) -> Result<()> {
    matmul_nt_with(ctx, enc, x, w, bias, y, true)
}

/// [`matmul_nt`], optionally never binding x as a uniform, so tests can
/// exercise the storage path on devices where the uniform path always applies.
pub(crate) fn matmul_nt_with(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    x: &GpuTensor,
    w: &GpuMatrix,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
    allow_uniform_x: bool,
) -> Result<()> {
    let op = format!("matmul_nt `{}`", w.name);
    let (n, c) = (w.rows, w.cols);
    check_tensor(ctx, &op, "x", x, Elem::F32)?;
    check_tensor(ctx, &op, "y", y, Elem::F32)?;
    if x.shape.last() != Some(&c) || !x.numel().is_multiple_of(c) {
        return Err(invalid(format!("{op}: x has shape {:?}, expected (T, {c})", x.shape)));
    }
    let t = x.numel() / c;
    if y.shape.last() != Some(&n) || y.numel() != t * n {
        return Err(invalid(format!("{op}: y has shape {:?}, expected ({t}, {n})", y.shape)));
    }
    if let Some(b) = bias {
        check_tensor(ctx, &op, "bias", b, Elem::F32)?;
        if b.numel() != n {
            return Err(invalid(format!("{op}: bias has {} values, expected {n}", b.numel())));
        }
    }

    let mode = matmul_x_mode(ctx, t, c, allow_uniform_x);
    let window = match mode {
        XMode::Storage => t,
        XMode::Uniform { window } => window,
    };
    let tile_t = matmul_tile_t(window);
    let token_tiles = window.div_ceil(tile_t as usize);
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    if token_tiles > max {
        return Err(invalid(format!(
            "{op}: {t} tokens need {token_tiles} tiles, more than {max}"
        )));
    }
    let window_bytes = (window * c * 4) as u64;
    let mut spec = ShaderSpec::new("matmul_nt_wq.wgsl", "main")
        .include("dequant_common.wgsl")
        .include(w.dequant_shader()?)
        .define_u32("WG_ROWS", ROW_TILE as u32)
        .define_u32("TILE_T", tile_t);
    spec = match mode {
        XMode::Storage => spec.include("matmul_x_storage.wgsl"),
        XMode::Uniform { .. } => spec
            .include("matmul_x_uniform.wgsl")
            .define_u32("X_VEC4S", (window_bytes / 16) as u32),
    };
    let x_bind = if mode == XMode::Storage {
        Bind::StorageRead
    } else {
        Bind::Uniform
    };
    let kernel = ctx.kernel(
        &spec,
        &[
            Bind::Uniform,
            Bind::StorageRead,
            x_bind,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;

    // Window starts. The last window is moved back to end at token T, so
    // every window is full; the tokens it shares with the previous window
    // are computed twice and written twice with the same values.
    let starts: Vec<usize> = (0..t).step_by(window).map(|s| s.min(t - window)).collect();
    for chunk in &w.chunks {
        let groups = chunk.rows.div_ceil(ROW_TILE);
        let gx = groups.min(max);
        let gz = groups.div_ceil(gx);
        for &t_base in &starts {
            let p = MatmulParams {
                t: window as u32,
                c: c as u32,
                n: n as u32,
                row0: chunk.row0 as u32,
                rows: chunk.rows as u32,
                row_bytes: w.row_bytes as u32,
                has_bias: bias.is_some() as u32,
                groups_x: gx as u32,
                t_base: t_base as u32,
                _pad: [0; 3],
            };
            let pbuf = params(ctx, &format!("{op} params"), &p);
            let x_binding = match mode {
                XMode::Storage => whole(&x.buffer),
                XMode::Uniform { .. } => wgpu::BufferBinding {
                    buffer: &x.buffer,
                    offset: (t_base * c * 4) as u64,
                    size: wgpu::BufferSize::new(window_bytes),
                },
            };
            let bind = ctx.bind_group(
                &kernel,
                &[
                    whole(&pbuf),
                    whole(&chunk.buffer),
                    x_binding,
                    whole(bias.map_or(&ctx.dummy, |b| &b.buffer)),
                    whole(&y.buffer),
                ],
            );
            enc.dispatch(&op, &kernel.pipeline, &bind, [gx as u32, token_tiles as u32, gz as u32]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// embed_rows_wq.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbedParams {
    t: u32,
    c: u32,
    row0: u32,
    rows: u32,
    row_bytes: u32,
    groups_x: u32,
    _pad: [u32; 2],
}

/// `out (T, C) = table[ids]` for `ids` (T) u32. Ids must be below
/// `table.rows` (rows for other ids are left untouched).
pub fn embed_rows(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    table: &GpuMatrix,
    ids: &GpuTensor,
    out: &GpuTensor,
) -> Result<()> {
    let op = format!("embed_rows `{}`", table.name);
    check_tensor(ctx, &op, "ids", ids, Elem::U32)?;
    check_tensor(ctx, &op, "out", out, Elem::F32)?;
    let (t, c) = (ids.numel(), table.cols);
    if out.numel() != t * c || out.shape.last() != Some(&c) {
        return Err(invalid(format!(
            "{op}: out has shape {:?}, expected ({t}, {c})",
            out.shape
        )));
    }
    let spec = ShaderSpec::new("embed_rows_wq.wgsl", "main")
        .include("dequant_common.wgsl")
        .include(table.dequant_shader()?);
    let kernel = ctx.kernel(
        &spec,
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, &op, (t * c).div_ceil(ELEMENTWISE_WG))?;
    for chunk in &table.chunks {
        let p = EmbedParams {
            t: t as u32,
            c: c as u32,
            row0: chunk.row0 as u32,
            rows: chunk.rows as u32,
            row_bytes: table.row_bytes as u32,
            groups_x: grid[0],
            _pad: [0; 2],
        };
        let pbuf = params(ctx, &format!("{op} params"), &p);
        let bind = ctx.bind_group(
            &kernel,
            &[
                whole(&pbuf),
                whole(&chunk.buffer),
                whole(&ids.buffer),
                whole(&out.buffer),
            ],
        );
        enc.dispatch(&op, &kernel.pipeline, &bind, grid);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// rms_norm_rows_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RmsNormParams {
    rows: u32,
    len: u32,
    eps: f32,
    groups_x: u32,
}

/// RMSNorm of each row of `row_len` values of `x` into `out`, with `weight`
/// (row_len). Layer norm: row_len = C; Qwen3 q/k norm: row_len = D;
/// OLMoE q/k norm: row_len = H*D.
pub fn rms_norm_rows(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    x: &GpuTensor,
    weight: &GpuTensor,
    out: &GpuTensor,
    row_len: usize,
    eps: f32,
) -> Result<()> {
    let op = "rms_norm_rows";
    check_tensor(ctx, op, "x", x, Elem::F32)?;
    check_tensor(ctx, op, "weight", weight, Elem::F32)?;
    check_tensor(ctx, op, "out", out, Elem::F32)?;
    if row_len == 0 || !x.numel().is_multiple_of(row_len) {
        return Err(invalid(format!("{op}: x ({:?}) is not rows of {row_len}", x.shape)));
    }
    if weight.numel() != row_len {
        return Err(invalid(format!(
            "{op}: weight has {} values, rows have {row_len}",
            weight.numel()
        )));
    }
    if out.numel() != x.numel() {
        return Err(invalid(format!(
            "{op}: out {:?} and x {:?} differ in size",
            out.shape, x.shape
        )));
    }
    let rows = x.numel() / row_len;
    let kernel = ctx.kernel(
        &ShaderSpec::new("rms_norm_rows_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, op, rows)?;
    let p = RmsNormParams {
        rows: rows as u32,
        len: row_len as u32,
        eps,
        groups_x: grid[0],
    };
    let pbuf = params(ctx, "rms_norm_rows params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&x.buffer),
            whole(&weight.buffer),
            whole(&out.buffer),
        ],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}

// ---------------------------------------------------------------------------
// rope_heads_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RopeParams {
    t: u32,
    h: u32,
    d: u32,
    interleaved: u32,
    groups_x: u32,
    _pad: [u32; 3],
}

/// `inv_freq[i] = 1 / theta^(2i/D)` in f32, the expression of `model::rope`,
/// so the GPU's angles are bit-identical to the CPU's. Cached per (theta, D).
fn rope_table(ctx: &GpuContext, theta: f32, d: usize) -> Result<std::sync::Arc<wgpu::Buffer>> {
    let key = (theta.to_bits(), d);
    let mut tables = ctx
        .rope_tables
        .lock()
        .map_err(|_| Error::Gpu("the RoPE table lock was poisoned by a panic in another thread".into()))?;
    if let Some(b) = tables.get(&key) {
        return Ok(b.clone());
    }
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    let buf = std::sync::Arc::new(ctx.upload_bytes(
        &format!("rope inv_freq theta={theta} D={d}"),
        bytemuck::cast_slice(&inv_freq),
    )?);
    tables.insert(key, buf.clone());
    Ok(buf)
}

/// Rotary embedding in place on `x` (T, H, D) (any shape with T*H*D values),
/// token t at position `positions[t]` (u32, T values).
#[allow(clippy::too_many_arguments)]
pub fn rope_heads(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    x: &GpuTensor,
    positions: &GpuTensor,
    heads: usize,
    head_dim: usize,
    theta: f32,
    style: RopeStyle,
) -> Result<()> {
    let op = "rope_heads";
    check_tensor(ctx, op, "x", x, Elem::F32)?;
    check_tensor(ctx, op, "positions", positions, Elem::U32)?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(format!("{op}: head dim {head_dim} must be even and positive")));
    }
    let t = positions.numel();
    if x.numel() != t * heads * head_dim {
        return Err(invalid(format!(
            "{op}: x {:?} is not ({t} tokens, {heads} heads, {head_dim})",
            x.shape
        )));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(invalid(format!("{op}: theta {theta} must be positive")));
    }
    let table = rope_table(ctx, theta, head_dim)?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("rope_heads_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageReadWrite,
            Bind::StorageRead,
            Bind::StorageRead,
        ],
    )?;
    let grid = grid_2d(ctx, op, (t * heads * head_dim / 2).div_ceil(ELEMENTWISE_WG))?;
    let p = RopeParams {
        t: t as u32,
        h: heads as u32,
        d: head_dim as u32,
        interleaved: (style == RopeStyle::Interleaved) as u32,
        groups_x: grid[0],
        _pad: [0; 3],
    };
    let pbuf = params(ctx, "rope_heads params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[whole(&pbuf), whole(&x.buffer), whole(&positions.buffer), whole(&table)],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}

// ---------------------------------------------------------------------------
// silu_mul_f32.wgsl and add_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ElementwiseParams {
    n: u32,
    groups_x: u32,
    _pad: [u32; 2],
}

fn same_size(op: &str, a: (&str, &GpuTensor), b: (&str, &GpuTensor)) -> Result<()> {
    if a.1.numel() != b.1.numel() {
        return Err(invalid(format!(
            "{op}: `{}` {:?} and `{}` {:?} differ in size",
            a.0, a.1.shape, b.0, b.1.shape
        )));
    }
    Ok(())
}

/// `h = silu(g) * u` elementwise (SwiGLU).
pub fn silu_mul(ctx: &GpuContext, enc: &mut GpuEncoder, g: &GpuTensor, u: &GpuTensor, h: &GpuTensor) -> Result<()> {
    let op = "silu_mul";
    for (name, t) in [("g", g), ("u", u), ("h", h)] {
        check_tensor(ctx, op, name, t, Elem::F32)?;
    }
    same_size(op, ("g", g), ("u", u))?;
    same_size(op, ("g", g), ("h", h))?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("silu_mul_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, op, g.numel().div_ceil(ELEMENTWISE_WG))?;
    let p = ElementwiseParams {
        n: g.numel() as u32,
        groups_x: grid[0],
        _pad: [0; 2],
    };
    let pbuf = params(ctx, "silu_mul params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[whole(&pbuf), whole(&g.buffer), whole(&u.buffer), whole(&h.buffer)],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}

/// `x += y` elementwise (the residual add).
pub fn add(ctx: &GpuContext, enc: &mut GpuEncoder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let op = "add";
    check_tensor(ctx, op, "x", x, Elem::F32)?;
    check_tensor(ctx, op, "y", y, Elem::F32)?;
    same_size(op, ("x", x), ("y", y))?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("add_f32.wgsl", "main"),
        &[Bind::Uniform, Bind::StorageReadWrite, Bind::StorageRead],
    )?;
    let grid = grid_2d(ctx, op, x.numel().div_ceil(ELEMENTWISE_WG))?;
    let p = ElementwiseParams {
        n: x.numel() as u32,
        groups_x: grid[0],
        _pad: [0; 2],
    };
    let pbuf = params(ctx, "add params", &p);
    let bind = ctx.bind_group(&kernel, &[whole(&pbuf), whole(&x.buffer), whole(&y.buffer)]);
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}
