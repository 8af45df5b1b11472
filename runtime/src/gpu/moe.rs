//! Host side of the MoE kernels: routing, grouping by expert, the grouped
//! expert matmul and the weighted combine. One function per WGSL file.
//!
//! The routing of a step lives in explicit buffers ([`Routing`]): router
//! logits (T, E), chosen experts `ids` (T, K) and their `weights` (T, K). A
//! selection policy may rewrite `ids` and `weights` between [`route_topk`]
//! and [`group_by_expert`]; everything after that reads only those buffers.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::context::{Elem, GpuContext, GpuEncoder, GpuTensor};
use crate::gpu::kernels::{ELEMENTWISE_WG, check_tensor, grid_2d, invalid, matmul_tile_t, params, whole};
use crate::gpu::pipelines::{Bind, ShaderSpec};
use crate::gpu::upload::{Convert, Part, WeightUpload};
use crate::gpu::weights::ROW_TILE;
use crate::tensor::{DType, QTensor};

/// The most experts the routing kernel handles (its bit set of taken experts).
pub const MAX_EXPERTS: usize = 256;
/// The most experts per token (the routing and grouping kernels' arrays).
pub const MAX_TOP_K: usize = 32;

/// Stacked expert weights (E, N, C) of one projection, in their stored
/// format, split into chunks of whole experts that each fit one storage binding.
#[derive(Debug)]
pub struct GpuExperts {
    pub name: String,
    pub experts: usize,
    /// Out features N per expert.
    pub rows: usize,
    /// In features C.
    pub cols: usize,
    pub dtype: DType,
    pub row_bytes: usize,
    /// (buffer, first expert, experts in it).
    pub(crate) chunks: Vec<(wgpu::Buffer, usize, usize)>,
}

impl GpuExperts {
    /// Uploads one (N, C) tensor per expert (in memory); all must share
    /// shape and format. F16/BF16 are widened to F32, as
    /// [`crate::gpu::GpuMatrix`] does.
    pub fn upload(ctx: &GpuContext, name: &str, experts: &[&QTensor]) -> Result<GpuExperts> {
        let mut up = WeightUpload::default();
        let e = Self::create(ctx, name, experts, &mut up)?;
        up.finish_resident(ctx)?;
        Ok(e)
    }

    /// Creates the chunk buffers and hands each expert's bytes to `up`,
    /// which writes them now (in memory) or as they stream in.
    pub(crate) fn create(
        ctx: &GpuContext,
        name: &str,
        experts: &[&QTensor],
        up: &mut WeightUpload,
    ) -> Result<GpuExperts> {
        let first = experts
            .first()
            .ok_or_else(|| invalid(format!("experts `{name}`: no experts")))?;
        let (rows, cols, src) = (first.rows(), first.cols(), first.dtype);
        for t in experts {
            if t.rows() != rows || t.cols() != cols || t.dtype != src {
                return Err(invalid(format!(
                    "experts `{name}`: `{}` is {} {:?}, but `{}` is {} {:?}; all experts must match",
                    t.name, t.dtype, t.shape, first.name, src, first.shape
                )));
            }
        }
        if experts.len() > MAX_EXPERTS {
            return Err(invalid(format!(
                "experts `{name}`: {} experts, at most {MAX_EXPERTS} supported",
                experts.len()
            )));
        }
        let dtype = match src {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        if dtype.is_quantized() && !dtype.fits_cols(cols) {
            return Err(invalid(format!(
                "experts `{name}`: rows of {cols} values are not whole {dtype} blocks"
            )));
        }
        let row_bytes = dtype.bytes_for(cols);
        let expert_bytes = rows * row_bytes;
        // Decoders may read one word past a field, so each chunk has a spare
        // word. The limit is the adapter's (see `max_binding_bytes`).
        let limit = ctx.max_binding_bytes() as usize - 8;
        let per_chunk = (limit / expert_bytes).min(experts.len());
        if per_chunk == 0 {
            return Err(Error::Gpu(format!(
                "experts `{name}`: one expert ({expert_bytes} bytes) does not fit a storage binding of {limit} bytes"
            )));
        }
        let convert = Convert::between(src, dtype);
        let mut chunks = Vec::new();
        for (ci, group) in experts.chunks(per_chunk).enumerate() {
            let e0 = ci * per_chunk;
            let parts: Vec<Part<'_>> = group
                .iter()
                .map(|t| Part {
                    tensor: t,
                    bytes: 0..t.byte_range().len(),
                    convert,
                })
                .collect();
            let label = format!("{name} experts {e0}..{} ({dtype})", e0 + group.len());
            let buffer = up.buffer(ctx, &label, (group.len() * expert_bytes + 4) as u64, false, &parts)?;
            chunks.push((buffer, e0, group.len()));
        }
        Ok(GpuExperts {
            name: name.to_string(),
            experts: experts.len(),
            rows,
            cols,
            dtype,
            row_bytes,
            chunks,
        })
    }

    /// Bytes of one expert's weights: what a step reads per active expert.
    pub fn expert_bytes(&self) -> u64 {
        (self.rows * self.row_bytes) as u64
    }

    fn dequant_shader(&self) -> Result<&'static str> {
        crate::gpu::weights::dequant_shader_for(self.dtype)
            .ok_or_else(|| Error::Gpu(format!("experts `{}`: no GPU decoder for {}", self.name, self.dtype)))
    }
}

/// The routing of one MoE layer for a step of T tokens.
#[derive(Debug)]
pub struct Routing {
    /// (T, E) router logits.
    pub logits: GpuTensor,
    /// (T, K) chosen experts, best first (u32).
    pub ids: GpuTensor,
    /// (T, K) routing weights.
    pub weights: GpuTensor,
}

/// Tokens grouped by expert (outputs of [`group_by_expert`]).
#[derive(Debug)]
pub struct Grouping {
    /// (E + 1) u32: expert e owns grouped positions offsets[e]..offsets[e + 1].
    pub offsets: GpuTensor,
    /// (T * K) u32: the assignment t * K + k at each grouped position.
    pub list: GpuTensor,
    /// (T, K) u32: each token's grouped positions in ascending expert order.
    pub order: GpuTensor,
    /// (T, K) f32: the routing weights in that order.
    pub order_w: GpuTensor,
    /// (1) u32: the number of experts with at least one token.
    pub active: GpuTensor,
}

impl Grouping {
    pub fn new(ctx: &GpuContext, t: usize, e: usize, k: usize) -> Result<Grouping> {
        Ok(Grouping {
            offsets: ctx.zeros_u32("moe offsets", &[e + 1])?,
            list: ctx.zeros_u32("moe list", &[t * k])?,
            order: ctx.zeros_u32("moe order", &[t, k])?,
            order_w: ctx.zeros_f32("moe order weights", &[t, k])?,
            active: ctx.zeros_u32("moe active experts", &[1])?,
        })
    }
}

// ---------------------------------------------------------------------------
// moe_route_topk_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RouteParams {
    t: u32,
    e: u32,
    k: u32,
    renormalize: u32,
    groups_x: u32,
    _pad: [u32; 3],
}

/// Softmax, top-k and optional renormalisation of `r.logits` into `r.ids`
/// and `r.weights`, as `model::route` does.
pub fn route_topk(ctx: &GpuContext, enc: &mut GpuEncoder, r: &Routing, renormalize: bool) -> Result<()> {
    let op = "route_topk";
    check_tensor(ctx, op, "logits", &r.logits, Elem::F32)?;
    check_tensor(ctx, op, "ids", &r.ids, Elem::U32)?;
    check_tensor(ctx, op, "weights", &r.weights, Elem::F32)?;
    let (t, e, k) = routing_dims(op, r)?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("moe_route_topk_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
        ],
    )?;
    let grid = grid_2d(ctx, op, t.div_ceil(64))?;
    let p = RouteParams {
        t: t as u32,
        e: e as u32,
        k: k as u32,
        renormalize: renormalize as u32,
        groups_x: grid[0],
        _pad: [0; 3],
    };
    let pbuf = params(ctx, "route_topk params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&r.logits.buffer),
            whole(&r.ids.buffer),
            whole(&r.weights.buffer),
        ],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}

/// (T, E, K) of a routing, checked for consistency and kernel limits.
fn routing_dims(op: &str, r: &Routing) -> Result<(usize, usize, usize)> {
    if r.logits.shape.len() != 2 || r.ids.shape.len() != 2 {
        return Err(invalid(format!(
            "{op}: logits {:?} and ids {:?} must be (T, E) and (T, K)",
            r.logits.shape, r.ids.shape
        )));
    }
    let (t, e, k) = (r.logits.shape[0], r.logits.shape[1], r.ids.shape[1]);
    if r.ids.shape[0] != t || r.weights.shape != r.ids.shape {
        return Err(invalid(format!(
            "{op}: logits {:?}, ids {:?}, weights {:?} disagree",
            r.logits.shape, r.ids.shape, r.weights.shape
        )));
    }
    if e > MAX_EXPERTS || k == 0 || k > MAX_TOP_K || k > e {
        return Err(invalid(format!(
            "{op}: E = {e}, K = {k}; need 1 <= K <= min(E, {MAX_TOP_K}), E <= {MAX_EXPERTS}"
        )));
    }
    Ok((t, e, k))
}

// ---------------------------------------------------------------------------
// moe_group_u32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GroupParams {
    t: u32,
    e: u32,
    k: u32,
    _pad: u32,
}

/// Groups the assignments of `r.ids` by expert into `g`.
pub fn group_by_expert(ctx: &GpuContext, enc: &mut GpuEncoder, r: &Routing, g: &Grouping) -> Result<()> {
    let op = "group_by_expert";
    let (t, e, k) = routing_dims(op, r)?;
    if g.offsets.numel() != e + 1 || g.list.numel() != t * k || g.order.numel() != t * k || g.order_w.numel() != t * k {
        return Err(invalid(format!(
            "{op}: grouping buffers are not sized for T = {t}, E = {e}, K = {k}"
        )));
    }
    let kernel = ctx.kernel(
        &ShaderSpec::new("moe_group_u32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
        ],
    )?;
    let p = GroupParams {
        t: t as u32,
        e: e as u32,
        k: k as u32,
        _pad: 0,
    };
    let pbuf = params(ctx, "group_by_expert params", &p);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&r.ids.buffer),
            whole(&r.weights.buffer),
            whole(&g.offsets.buffer),
            whole(&g.list.buffer),
            whole(&g.order.buffer),
            whole(&g.order_w.buffer),
            whole(&g.active.buffer),
        ],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, [1, 1, 1]);
    Ok(())
}

// ---------------------------------------------------------------------------
// moe_matmul_nt_wq.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MoeMatmulParams {
    c: u32,
    n: u32,
    e0: u32,
    row_bytes: u32,
    expert_bytes: u32,
    gather: u32,
    k: u32,
    _pad: u32,
}

/// How the grouped matmul finds each grouped position's input row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeInput {
    /// x is (T, C): the token's hidden state (gate and up projections).
    Tokens,
    /// x is (T * K, C) in grouped order (the down projection).
    Grouped,
}

/// `y[j] = x_row(j) · W_eᵀ` for every grouped position j of every expert e
/// with tokens; y is (T * K, N) in grouped order. `t` is the step's token count.
pub fn moe_matmul(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    w: &GpuExperts,
    x: &GpuTensor,
    input: MoeInput,
    g: &Grouping,
    t: usize,
    k: usize,
    y: &GpuTensor,
) -> Result<()> {
    let op = format!("moe_matmul `{}`", w.name);
    check_tensor(ctx, &op, "x", x, Elem::F32)?;
    check_tensor(ctx, &op, "y", y, Elem::F32)?;
    let x_rows = match input {
        MoeInput::Tokens => t,
        MoeInput::Grouped => t * k,
    };
    if x.numel() != x_rows * w.cols {
        return Err(invalid(format!(
            "{op}: x has shape {:?}, expected ({x_rows}, {})",
            x.shape, w.cols
        )));
    }
    if y.numel() != t * k * w.rows {
        return Err(invalid(format!(
            "{op}: y has shape {:?}, expected ({}, {})",
            y.shape,
            t * k,
            w.rows
        )));
    }
    if g.offsets.numel() != w.experts + 1 || g.list.numel() != t * k {
        return Err(invalid(format!(
            "{op}: grouping is not for {} experts and {} assignments",
            w.experts,
            t * k
        )));
    }
    let tile_t = matmul_tile_t(t);
    let spec = ShaderSpec::new("moe_matmul_nt_wq.wgsl", "main")
        .include("dequant_common.wgsl")
        .include(w.dequant_shader()?)
        .define_u32("WG_ROWS", ROW_TILE as u32)
        .define_u32("TILE_T", tile_t);
    let kernel = ctx.kernel(
        &spec,
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let gx = w.rows.div_ceil(ROW_TILE);
    let gy = t.div_ceil(tile_t as usize);
    if gx > max || gy > max {
        return Err(invalid(format!("{op}: grid {gx} x {gy} exceeds {max} per dimension")));
    }
    for (buffer, e0, n) in &w.chunks {
        let p = MoeMatmulParams {
            c: w.cols as u32,
            n: w.rows as u32,
            e0: *e0 as u32,
            row_bytes: w.row_bytes as u32,
            expert_bytes: w.expert_bytes() as u32,
            gather: (input == MoeInput::Tokens) as u32,
            k: k as u32,
            _pad: 0,
        };
        let pbuf = params(ctx, &format!("{op} params"), &p);
        let bind = ctx.bind_group(
            &kernel,
            &[
                whole(&pbuf),
                whole(buffer),
                whole(&x.buffer),
                whole(&g.offsets.buffer),
                whole(&g.list.buffer),
                whole(&y.buffer),
            ],
        );
        enc.dispatch(&op, &kernel.pipeline, &bind, [gx as u32, gy as u32, *n as u32]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// moe_combine_f32.wgsl

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CombineParams {
    t: u32,
    c: u32,
    k: u32,
    has_shared: u32,
    groups_x: u32,
    _pad: [u32; 3],
}

/// `x[t] += Σ_r order_w[t, r] · y[order[t, r]] (+ sigmoid(gate[t]) · shared[t])`.
pub fn moe_combine(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    x: &GpuTensor,
    y: &GpuTensor,
    g: &Grouping,
    shared: Option<(&GpuTensor, &GpuTensor)>,
) -> Result<()> {
    let op = "moe_combine";
    check_tensor(ctx, op, "x", x, Elem::F32)?;
    check_tensor(ctx, op, "y", y, Elem::F32)?;
    let (t, k) = (g.order.shape[0], g.order.shape[1]);
    let c = x.numel() / t.max(1);
    if x.numel() != t * c || y.numel() != t * k * c {
        return Err(invalid(format!(
            "{op}: x {:?} / y {:?} do not match T = {t}, K = {k}",
            x.shape, y.shape
        )));
    }
    if let Some((s, gate)) = shared {
        if s.numel() != t * c || gate.numel() != t {
            return Err(invalid(format!(
                "{op}: shared {:?} / gate {:?} do not match T = {t}",
                s.shape, gate.shape
            )));
        }
    }
    let kernel = ctx.kernel(
        &ShaderSpec::new("moe_combine_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageReadWrite,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
        ],
    )?;
    let grid = grid_2d(ctx, op, (t * c).div_ceil(ELEMENTWISE_WG))?;
    let p = CombineParams {
        t: t as u32,
        c: c as u32,
        k: k as u32,
        has_shared: shared.is_some() as u32,
        groups_x: grid[0],
        _pad: [0; 3],
    };
    let pbuf = params(ctx, "moe_combine params", &p);
    let (sb, gb) = match shared {
        Some((s, gate)) => (&s.buffer, &gate.buffer),
        None => (&ctx.dummy, &ctx.dummy),
    };
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&x.buffer),
            whole(&y.buffer),
            whole(&g.order.buffer),
            whole(&g.order_w.buffer),
            whole(sb),
            whole(gb),
        ],
    );
    enc.dispatch(op, &kernel.pipeline, &bind, grid);
    Ok(())
}
