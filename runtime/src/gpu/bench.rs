//! Kernel micro-benchmarks: the GPU matmul (timed with timestamp queries when
//! the adapter has them, else by the wall clock around a blocking wait) and
//! the CPU reference `QLinear::forward` (rayon) on the same shape, and the
//! GPU cost of the expert-selection kernels.
//! Run them with `cargo test -p lynx --lib gpu::tests::bench -- --ignored --nocapture`.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::context::{GpuContext, GpuEncoder};
use crate::gpu::kernels::matmul_nt;
use crate::gpu::moe::{Routing, route_topk};
use crate::gpu::selection::{PolicyBuffers, apply_policy, log_record_len};
use crate::gpu::weights::GpuMatrix;
use crate::linear::QLinear;
use crate::selection::Resolved;
use crate::tensor::{DType, QTensor, quantize};

/// Deterministic values in [-1, 1): benchmarks need data, not quality.
pub(crate) fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bench_weight(dtype: DType, n: usize, c: usize) -> QTensor {
    let w = seeded(n * c, 1);
    QTensor::from_bytes("bench.weight", dtype, vec![n, c], quantize(dtype, &w))
}

/// Seconds per repetition of the kernels `record` encodes: timed with
/// timestamp queries when the adapter has them (only GPU time counts), else
/// by the wall clock around a blocking wait. One untimed run first compiles
/// the pipelines and faults in the buffers.
pub(crate) fn time_kernels(
    ctx: &GpuContext,
    iters: usize,
    mut record: impl FnMut(&mut GpuEncoder) -> Result<()>,
) -> Result<f64> {
    let iters = iters.max(1);
    let mut enc = ctx.encoder("bench warm-up");
    record(&mut enc)?;
    ctx.submit(enc)?;
    ctx.wait()?;

    if ctx.features().timestamp_query {
        let query_set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench timestamp resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = ctx.encoder("bench timed");
        enc.timestamp(&query_set, 0);
        for _ in 0..iters {
            record(&mut enc)?;
        }
        enc.timestamp(&query_set, 1);
        enc.inner().resolve_query_set(&query_set, 0..2, &resolve, 0);
        ctx.submit(enc)?;
        let bytes = ctx.read_bytes(&resolve, 16, "reading benchmark timestamps")?;
        let ts: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        let ticks = ts[1]
            .checked_sub(ts[0])
            .ok_or_else(|| Error::Gpu("timestamps went backwards".into()))?;
        Ok(ticks as f64 * ctx.queue.get_timestamp_period() as f64 * 1e-9 / iters as f64)
    } else {
        let mut enc = ctx.encoder("bench timed");
        for _ in 0..iters {
            record(&mut enc)?;
        }
        let start = Instant::now();
        ctx.submit(enc)?;
        ctx.wait()?;
        Ok(start.elapsed().as_secs_f64() / iters as f64)
    }
}

/// Times `y (T, N) = x (T, C) · Wᵀ` on the GPU for a random `dtype` weight
/// (N, C). Returns (seconds per matmul, GB/s of weight bytes read).
pub fn bench_matmul(ctx: &GpuContext, dtype: DType, n: usize, c: usize, t: usize, iters: usize) -> Result<(f64, f64)> {
    let w = GpuMatrix::upload(ctx, &bench_weight(dtype, n, c))?;
    let x = ctx.upload_f32("bench.x", &seeded(t * c, 2), &[t, c])?;
    let y = ctx.zeros_f32("bench.y", &[t, n])?;
    let seconds = time_kernels(ctx, iters, |enc| matmul_nt(ctx, enc, &x, &w, None, &y))?;
    Ok((seconds, w.data_bytes() as f64 / seconds / 1e9))
}

/// GPU seconds one MoE layer's expert selection adds to a decode step of
/// `t` tokens under `policy`: the routing plus the policy's kernels (bins,
/// scores, active set, remap), minus the routing alone, on seeded router
/// logits (T, E) with top-`k` routing.
pub fn bench_selection(ctx: &GpuContext, policy: Resolved, t: usize, e: usize, k: usize, iters: usize) -> Result<f64> {
    let logits: Vec<f32> = seeded(t * e, 3).iter().map(|v| v * 4.0).collect();
    let r = Routing {
        logits: ctx.upload_f32("bench router logits", &logits, &[t, e])?,
        ids: ctx.zeros_u32("bench ids", &[t, k])?,
        weights: ctx.zeros_f32("bench weights", &[t, k])?,
    };
    let buffers = PolicyBuffers::new(ctx, e)?;
    let log = ctx.zeros_u32("bench selection log", &[log_record_len(t, k)])?;
    let route = time_kernels(ctx, iters, |enc| route_topk(ctx, enc, &r, true))?;
    let both = time_kernels(ctx, iters, |enc| {
        route_topk(ctx, enc, &r, true)?;
        apply_policy(ctx, enc, policy, &r, true, &buffers, &log, 0)
    })?;
    Ok((both - route).max(0.0))
}

/// The same measurement for the CPU reference `QLinear::forward` (rayon over
/// all cores). Returns (seconds per matmul, GB/s of weight bytes read).
pub fn bench_cpu_matmul(dtype: DType, n: usize, c: usize, t: usize, iters: usize) -> (f64, f64) {
    let iters = iters.max(1);
    let lin = QLinear::new(bench_weight(dtype, n, c), None);
    let x = seeded(t * c, 2);
    std::hint::black_box(lin.forward(&x, t));
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(lin.forward(&x, t));
    }
    let seconds = start.elapsed().as_secs_f64() / iters as f64;
    (seconds, dtype.bytes_for(n * c) as f64 / seconds / 1e9)
}
