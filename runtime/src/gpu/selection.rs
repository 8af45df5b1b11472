//! Host side of the expert-selection kernels: AffinityBinning bins and
//! scores, the active set, and the remap of each token's routing. One
//! function per WGSL file; [`apply_policy`] runs a resolved policy between
//! `route_topk` and `group_by_expert`, entirely on the GPU.
//!
//! The policy log of a step is one u32 buffer with a record per layer of
//! `1 + 2 * T * K` values: the distinct experts of the exact routing, the
//! bins (i32) of the exact slots, and each slot's remapped flag.

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::context::{Elem, GpuContext, GpuEncoder, GpuTensor};
use crate::gpu::kernels::{check_tensor, invalid, params, whole};
use crate::gpu::moe::Routing;
use crate::gpu::pipelines::{Bind, ShaderSpec};
use crate::selection::{LynxParams, Resolved, pow_inv};

/// Length of one layer's record in the policy log for T tokens and K slots.
pub fn log_record_len(t: usize, k: usize) -> usize {
    1 + 2 * t * k
}

/// Per-step buffers the policies use (E values each).
#[derive(Clone, Debug)]
pub struct PolicyBuffers {
    pub score: GpuTensor,
    pub top1: GpuTensor,
    pub active: GpuTensor,
}

impl PolicyBuffers {
    pub fn new(ctx: &GpuContext, e: usize) -> Result<PolicyBuffers> {
        Ok(PolicyBuffers {
            score: ctx.zeros_f32("lynx scores", &[e])?,
            top1: ctx.zeros_u32("lynx top-1 experts", &[e])?,
            active: ctx.zeros_u32("active experts", &[e])?,
        })
    }
}

fn dims(r: &Routing) -> (usize, usize, usize) {
    (r.logits.shape[0], r.logits.shape[1], r.ids.shape[1])
}

fn check_log(ctx: &GpuContext, op: &str, log: &GpuTensor, base: usize, t: usize, k: usize) -> Result<()> {
    check_tensor(ctx, op, "log", log, Elem::U32)?;
    if base + log_record_len(t, k) > log.numel() {
        return Err(invalid(format!(
            "{op}: policy log {:?} has no record at {base}",
            log.shape
        )));
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BinParams {
    t: u32,
    e: u32,
    k: u32,
    beta: u32,
    alpha: f32,
    log_base: u32,
    _pad: [u32; 2],
}

/// lynx_bin_f32.wgsl: the bins of the exact routing into the log record at `base`.
pub fn lynx_bin(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    r: &Routing,
    p: LynxParams,
    log: &GpuTensor,
    base: usize,
) -> Result<()> {
    let (t, e, k) = dims(r);
    check_log(ctx, "lynx_bin", log, base, t, k)?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("lynx_bin_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let prm = BinParams {
        t: t as u32,
        e: e as u32,
        k: k as u32,
        beta: p.beta,
        alpha: p.alpha,
        log_base: base as u32,
        _pad: [0; 2],
    };
    let pbuf = params(ctx, "lynx_bin params", &prm);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&r.logits.buffer),
            whole(&r.ids.buffer),
            whole(&log.buffer),
        ],
    );
    enc.dispatch("lynx_bin", &kernel.pipeline, &bind, [t.div_ceil(64) as u32, 1, 1]);
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ScoreParams {
    t: u32,
    e: u32,
    k: u32,
    log_base: u32,
    inv_b: f32,
    _pad: [u32; 3],
}

/// lynx_score_f32.wgsl: per-expert scores and top-1 marks.
pub fn lynx_score(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    r: &Routing,
    b: &PolicyBuffers,
    log: &GpuTensor,
    base: usize,
) -> Result<()> {
    let (t, e, k) = dims(r);
    check_log(ctx, "lynx_score", log, base, t, k)?;
    let kernel = ctx.kernel(
        &ShaderSpec::new("lynx_score_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
        ],
    )?;
    let prm = ScoreParams {
        t: t as u32,
        e: e as u32,
        k: k as u32,
        log_base: base as u32,
        inv_b: 1.0 / t as f32,
        _pad: [0; 3],
    };
    let pbuf = params(ctx, "lynx_score params", &prm);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&r.ids.buffer),
            whole(&log.buffer),
            whole(&b.score.buffer),
            whole(&b.top1.buffer),
        ],
    );
    enc.dispatch("lynx_score", &kernel.pipeline, &bind, [e.div_ceil(64) as u32, 1, 1]);
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ActiveParams {
    t: u32,
    e: u32,
    k: u32,
    mode: u32,
    keep: u32,
    tau: f32,
    log_base: u32,
    _pad: u32,
}

/// moe_active_set_u32.wgsl: the active set for `policy` (not `Exact`).
pub fn active_set(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    r: &Routing,
    policy: Resolved,
    b: &PolicyBuffers,
    log: &GpuTensor,
    base: usize,
) -> Result<()> {
    let (t, e, k) = dims(r);
    check_log(ctx, "active_set", log, base, t, k)?;
    let (mode, keep, tau) = match policy {
        Resolved::Lynx(p) => (0, 1, pow_inv(1.0 / t as f32, p.threshold_bin)),
        Resolved::Keep { keep, union: true } => (1, keep, 0.0),
        Resolved::Keep { keep, union: false } => (2, keep, 0.0),
        Resolved::Exact => return Err(invalid("active_set: the exact policy has no active set".into())),
    };
    let kernel = ctx.kernel(
        &ShaderSpec::new("moe_active_set_u32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
        ],
    )?;
    let prm = ActiveParams {
        t: t as u32,
        e: e as u32,
        k: k as u32,
        mode,
        keep: keep as u32,
        tau,
        log_base: base as u32,
        _pad: 0,
    };
    let pbuf = params(ctx, "active_set params", &prm);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&r.ids.buffer),
            whole(&b.score.buffer),
            whole(&b.top1.buffer),
            whole(&b.active.buffer),
            whole(&log.buffer),
        ],
    );
    enc.dispatch("active_set", &kernel.pipeline, &bind, [1, 1, 1]);
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RemapParams {
    t: u32,
    e: u32,
    k: u32,
    keep: u32,
    renormalize: u32,
    log_base: u32,
    _pad: [u32; 2],
}

/// moe_remap_f32.wgsl: rewrites `r.ids` and `r.weights` onto the active set.
#[allow(clippy::too_many_arguments)]
pub fn remap(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    r: &Routing,
    keep: usize,
    renormalize: bool,
    b: &PolicyBuffers,
    log: &GpuTensor,
    base: usize,
) -> Result<()> {
    let (t, e, k) = dims(r);
    check_log(ctx, "remap", log, base, t, k)?;
    if keep == 0 || keep > k {
        return Err(invalid(format!("remap: keep {keep} must be in 1..={k}")));
    }
    let kernel = ctx.kernel(
        &ShaderSpec::new("moe_remap_f32.wgsl", "main"),
        &[
            Bind::Uniform,
            Bind::StorageRead,
            Bind::StorageReadWrite,
            Bind::StorageReadWrite,
            Bind::StorageRead,
            Bind::StorageReadWrite,
        ],
    )?;
    let prm = RemapParams {
        t: t as u32,
        e: e as u32,
        k: k as u32,
        keep: keep as u32,
        renormalize: renormalize as u32,
        log_base: base as u32,
        _pad: [0; 2],
    };
    let pbuf = params(ctx, "remap params", &prm);
    let bind = ctx.bind_group(
        &kernel,
        &[
            whole(&pbuf),
            whole(&r.logits.buffer),
            whole(&r.ids.buffer),
            whole(&r.weights.buffer),
            whole(&b.active.buffer),
            whole(&log.buffer),
        ],
    );
    enc.dispatch("remap", &kernel.pipeline, &bind, [t.div_ceil(64) as u32, 1, 1]);
    Ok(())
}

/// Runs `policy` on a routing that `route_topk` has just written: bins and
/// scores (Lynx), the active set, and the remap. `Exact` records nothing.
#[allow(clippy::too_many_arguments)]
pub fn apply_policy(
    ctx: &GpuContext,
    enc: &mut GpuEncoder,
    policy: Resolved,
    r: &Routing,
    renormalize: bool,
    b: &PolicyBuffers,
    log: &GpuTensor,
    base: usize,
) -> Result<()> {
    let keep = match policy {
        Resolved::Exact => return Ok(()),
        Resolved::Lynx(p) => {
            lynx_bin(ctx, enc, r, p, log, base)?;
            lynx_score(ctx, enc, r, b, log, base)?;
            1
        }
        Resolved::Keep { keep, .. } => keep,
    };
    active_set(ctx, enc, r, policy, b, log, base)?;
    remap(ctx, enc, r, keep, renormalize, b, log, base)
}
