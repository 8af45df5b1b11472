//! Host side of the attention kernels (KV-cache append, split attention and
//! its merge) and two small helpers used around them (row gather, clamp).
//! One function per WGSL file; see each shader's header for its layout.

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::context::{Elem, GpuContext, GpuEncoder, GpuTensor};
use crate::gpu::kernels::{ELEMENTWISE_WG, check_tensor, grid_2d, invalid, params, whole};
use crate::gpu::pipelines::{Bind, ShaderSpec};

/// Keys per split of [`attention`]: a decode step over a context of n
/// positions runs ceil(n / SPLIT) workgroups per head.
pub const ATTENTION_SPLIT: usize = 256;

// ---------------------------------------------------------------------------
// kv_append_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AppendParams {
    t: u32,
    width: u32,
    groups_x: u32,
    _pad: u32,
}

/// Copies `k` and `v` (T, Hkv * D) into cache rows `dest` (T) of `k_cache`
/// and `v_cache` (rows, Hkv * D).
pub fn kv_append(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    k: &GpuTensor,
    v: &GpuTensor,
    dest: &GpuTensor,
    k_cache: &GpuTensor,
    v_cache: &GpuTensor,
) -> Result<()> {
    let op = "kv_append";
    for (n, t) in [("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)] {
        check_tensor(ctx, op, n, t, Elem::F32)?;
    }
    check_tensor(ctx, op, "dest", dest, Elem::U32)?;
    let t = dest.numel();
    let width = k_cache.shape.last().copied().unwrap_or(0);
    if width == 0 || k.numel() != t * width || v.numel() != t * width || v_cache.shape != k_cache.shape {
        return Err(invalid(format!(
            "{op}: k {:?}, v {:?}, dest {:?}, caches {:?}/{:?} disagree",
            k.shape, v.shape, dest.shape, k_cache.shape, v_cache.shape
        )));
    }
    let kernel = ctx.kernel(
        &ShaderSpec::new("kv_append_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, op, (t * width).div_ceil(ELEMENTWISE_WG))?;
    let p = AppendParams {
        t: t as u32,
        width: width as u32,
        groups_x: grid[0],
        _pad: 0,
    };
    let pbuf = params(ctx, "kv_append params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&k.buffer),
            whole(&v.buffer),
            whole(&dest.buffer),
            whole(&k_cache.buffer),
            whole(&v_cache.buffer),
        ],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}

// ---------------------------------------------------------------------------
// attention_split_f32.wgsl + attention_merge_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SplitParams {
    h: u32,
    hkv: u32,
    page: u32,
    max_pages: u32,
    splits: u32,
    window: u32,
    scale: f32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MergeParams {
    th: u32,
    d: u32,
    splits: u32,
    groups_x: u32,
}

/// Shapes and cache layout of one [`attention`] call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// H.
    pub heads: usize,
    /// Hkv.
    pub kv_heads: usize,
    /// D.
    pub head_dim: usize,
    /// Tokens per KV page.
    pub page: usize,
    /// Row stride of the page table.
    pub max_pages: usize,
    /// The longest visible key range of any query in the step (sets the
    /// number of splits).
    pub max_keys: usize,
    pub sliding_window: Option<usize>,
}

/// Causal attention of `q` (T, H, D) over the paged cache. `tok` (T, 2) holds
/// each query's (sequence index, position), `pages` (B, max_pages) the page
/// table. Writes `out` (T, H * D). Two dispatches: splits, then merge.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    s: &AttentionShape,
    q: &GpuTensor,
    k_cache: &GpuTensor,
    v_cache: &GpuTensor,
    tok: &GpuTensor,
    pages: &GpuTensor,
    out: &GpuTensor,
) -> Result<()> {
    let op = "attention";
    for (n, t) in [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)] {
        check_tensor(ctx, op, n, t, Elem::F32)?;
    }
    check_tensor(ctx, op, "tok", tok, Elem::U32)?;
    check_tensor(ctx, op, "pages", pages, Elem::U32)?;
    let (h, hkv, d) = (s.heads, s.kv_heads, s.head_dim);
    let t = tok.numel() / 2;
    if hkv == 0 || h % hkv != 0 || d == 0 || s.page == 0 {
        return Err(invalid(format!(
            "{op}: {h} heads, {hkv} kv heads, head dim {d}, page {}",
            s.page
        )));
    }
    if q.numel() != t * h * d || out.numel() != t * h * d || tok.numel() != t * 2 {
        return Err(invalid(format!(
            "{op}: q {:?}, out {:?}, tok {:?} disagree",
            q.shape, out.shape, tok.shape
        )));
    }
    if k_cache.numel() % (hkv * d) != 0 || pages.numel() % s.max_pages.max(1) != 0 {
        return Err(invalid(format!(
            "{op}: cache {:?} / page table {:?} malformed",
            k_cache.shape, pages.shape
        )));
    }
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let splits = s.max_keys.div_ceil(ATTENTION_SPLIT).max(1);
    if splits > max || h > max || t > max {
        return Err(invalid(format!(
            "{op}: grid ({splits}, {h}, {t}) exceeds {max} per dimension"
        )));
    }
    let part_o = ctx.zeros_f32("attention partial outputs", &[t, h, splits, d])?;
    let part_ml = ctx.zeros_f32("attention partial max/sum", &[t, h, splits, 2])?;

    let split = ctx.kernel(
        &ShaderSpec::new("attention_split_f32.wgsl", "main")
            .define_u32("HEAD_DIM", d as u32)
            .define_u32("SPLIT", ATTENTION_SPLIT as u32),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
        ],
    )?;
    let p = SplitParams {
        h: h as u32,
        hkv: hkv as u32,
        page: s.page as u32,
        max_pages: s.max_pages as u32,
        splits: splits as u32,
        window: s.sliding_window.unwrap_or(0) as u32,
        scale: 1.0 / (d as f32).sqrt(),
        _pad: 0,
    };
    let pbuf = params(ctx, "attention split params", &p);
    let bind = ctx.bind_group(
        &split,
        &[
            whole(&pbuf),
            whole(&q.buffer),
            whole(&k_cache.buffer),
            whole(&v_cache.buffer),
            whole(&tok.buffer),
            whole(&pages.buffer),
            whole(&part_o.buffer),
            whole(&part_ml.buffer),
        ],
    );
    enc.dispatch(
        "attention split",
        &split.pipeline,
        &bind,
        [splits as u32, h as u32, t as u32],
    );

    let merge = ctx.kernel(
        &ShaderSpec::new("attention_merge_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, op, t * h)?;
    let mp = MergeParams {
        th: (t * h) as u32,
        d: d as u32,
        splits: splits as u32,
        groups_x: grid[0],
    };
    let mbuf = params(ctx, "attention merge params", &mp);
    let bind = ctx.bind_group(
        &merge,
        &[
            whole(&mbuf),
            whole(&part_o.buffer),
            whole(&part_ml.buffer),
            whole(&out.buffer),
        ],
    );
    enc.dispatch("attention merge", &merge.pipeline, &bind, grid);
    Ok(())
}

// ---------------------------------------------------------------------------
// gather_rows_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GatherParams {
    r: u32,
    c: u32,
    groups_x: u32,
    _pad: u32,
}

/// `out[r] = x[idx[r]]` for `x` (T, C), `idx` (R) and `out` (R, C).
pub fn gather_rows(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    x: &GpuTensor,
    idx: &GpuTensor,
    out: &GpuTensor,
) -> Result<()> {
    let op = "gather_rows";
    check_tensor(ctx, op, "x", x, Elem::F32)?;
    check_tensor(ctx, op, "idx", idx, Elem::U32)?;
    check_tensor(ctx, op, "out", out, Elem::F32)?;
    let r = idx.numel();
    let c = out.numel() / r;
    if out.numel() != r * c || c == 0 || x.numel() % c != 0 {
        return Err(invalid(format!(
            "{op}: x {:?}, idx {:?}, out {:?} disagree",
            x.shape, idx.shape, out.shape
        )));
    }
    let kernel = ctx.kernel(
        &ShaderSpec::new("gather_rows_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, op, (r * c).div_ceil(ELEMENTWISE_WG))?;
    let p = GatherParams {
        r: r as u32,
        c: c as u32,
        groups_x: grid[0],
        _pad: 0,
    };
    let pbuf = params(ctx, "gather_rows params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[whole(&pbuf), whole(&x.buffer), whole(&idx.buffer), whole(&out.buffer)],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}

// ---------------------------------------------------------------------------
// clamp_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ClampParams {
    n: u32,
    groups_x: u32,
    limit: f32,
    _pad: u32,
}

/// `x = clamp(x, -limit, limit)` in place.
pub fn clamp(ctx: &GpuContext, enc: &mut GpuEncoder, x: &GpuTensor, limit: f32) -> Result<()> {
    let op = "clamp";
    check_tensor(ctx, op, "x", x, Elem::F32)?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("clamp_f32.wgsl", "main"),
        &[Bind::Uniform, Bind::StorageReadWrite],
    )?;
    let grid = grid_2d(ctx, op, x.numel().div_ceil(ELEMENTWISE_WG))?;
    let p = ClampParams {
        n: x.numel() as u32,
        groups_x: grid[0],
        limit,
        _pad: 0,
    };
    let pbuf = params(ctx, "clamp params", &p);
    let bind = ctx.bind_group(&kernel, &[whole(&pbuf), whole(&x.buffer)]);
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}
