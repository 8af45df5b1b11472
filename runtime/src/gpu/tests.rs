//! Every kernel against the CPU reference, on seeded inputs and several
//! shapes (odd token counts, out-features that are not a multiple of the
//! workgroup, rows that are not 4-byte aligned, chunked weights).
//!
//! These tests need a GPU adapter; CI installs the software lavapipe driver.
//! Without one they fail with the message that says how to get one, unless
//! `LYNX_SKIP_GPU_TESTS=1` is set, in which case they report a skip and pass.

use std::sync::{Arc, OnceLock};

use crate::config::RopeStyle;
use crate::gpu::bench::seeded;
use crate::gpu::pipelines::{Bind, DefineValue, ShaderSpec};
use crate::gpu::*;
use crate::linear::QLinear;
use crate::model;
use crate::tensor::{DType, QTensor, quantize};

/// The shared context, or `None` when GPU tests are switched off.
pub(crate) fn ctx() -> Option<&'static GpuContext> {
    if std::env::var("LYNX_SKIP_GPU_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("GPU test skipped: LYNX_SKIP_GPU_TESTS=1");
        return None;
    }
    static CTX: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        let ctx = GpuContext::new(GpuOptions::from_env()).map_err(|e| e.to_string())?;
        eprintln!("GPU tests on {}", ctx.adapter_report());
        Ok(ctx)
    });
    match ctx {
        Ok(c) => Some(c),
        Err(e) => panic!("{e} (set LYNX_SKIP_GPU_TESTS=1 to skip the GPU tests)"),
    }
}

/// The largest absolute error and the largest error relative to `1 + |ref|`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MaxErr {
    abs: f32,
    rel: f32,
}

impl MaxErr {
    fn max(self, o: MaxErr) -> MaxErr {
        MaxErr {
            abs: self.abs.max(o.abs),
            rel: self.rel.max(o.rel),
        }
    }
}

impl std::fmt::Display for MaxErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "max abs err {:.2e}, max err/(1+|ref|) {:.2e}", self.abs, self.rel)
    }
}

/// Asserts `|got - want| <= tol * (1 + |want|)` everywhere and returns the
/// largest errors. The message names the first failing index as (row, col)
/// of a row-major matrix with `cols` columns.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], cols: usize, tol: f32) -> MaxErr {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut max = MaxErr::default();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let bound = tol * (1.0 + w.abs());
        assert!(
            err <= bound,
            "{what}: index {i} (row {}, col {}): got {g}, want {w}, |err| {err} > {bound}",
            i / cols,
            i % cols
        );
        max = max.max(MaxErr {
            abs: err,
            rel: err / (1.0 + w.abs()),
        });
    }
    max
}

/// Records the kernels `f` adds to a fresh encoder and submits them.
pub(crate) fn run(ctx: &GpuContext, label: &str, f: impl FnOnce(&mut GpuEncoder) -> crate::Result<()>) {
    let mut enc = ctx.encoder(label);
    f(&mut enc).unwrap_or_else(|e| panic!("{label}: {e}"));
    ctx.submit(enc).unwrap_or_else(|e| panic!("{label}: {e}"));
}

fn weight(dtype: DType, n: usize, c: usize, seed: u64) -> QTensor {
    let w = seeded(n * c, seed);
    QTensor::from_bytes(format!("w{n}x{c}.{dtype}"), dtype, vec![n, c], quantize(dtype, &w))
}

/// Every stored format.
const ALL_DTYPES: [DType; 13] = DType::ALL;

/// Row lengths (C) to test a format at. 32-value formats: 64; 96, which
/// puts Q8_0/Q4_0/Q5_0 rows 2 bytes off 4-byte alignment on every other
/// row; 256; and a real hidden size. K-quant rows need whole 256-value
/// super-blocks: 768 values (3 super-blocks) make Q6_K (630-byte) and Q3_K
/// (330-byte) rows 2-aligned on every other row likewise.
fn cols_for(dtype: DType) -> [usize; 4] {
    if dtype.block().0 == 256 {
        [256, 768, 2048, 4096]
    } else {
        [64, 96, 256, 4096]
    }
}

/// Bytes a row takes on the GPU: F16/BF16 are widened to F32 on upload.
fn gpu_row_bytes(dtype: DType, c: usize) -> usize {
    if matches!(dtype, DType::F16 | DType::BF16) {
        4 * c
    } else {
        dtype.bytes_for(c)
    }
}

/// Runs the GPU matmul and QLinear::forward on the same inputs and compares,
/// once with x bound as the kernel prefers and once forced into storage.
fn check_matmul(ctx: &GpuContext, w: &QTensor, gw: &GpuMatrix, t: usize, with_bias: bool) -> MaxErr {
    let a = check_matmul_x(ctx, w, gw, t, with_bias, true);
    a.max(check_matmul_x(ctx, w, gw, t, with_bias, false))
}

fn check_matmul_x(ctx: &GpuContext, w: &QTensor, gw: &GpuMatrix, t: usize, with_bias: bool, uniform_x: bool) -> MaxErr {
    let (n, c) = (w.rows(), w.cols());
    let x = seeded(t * c, 7 + t as u64);
    let bias = with_bias.then(|| seeded(n, 11));
    let want = QLinear::new(w.clone(), bias.clone()).forward(&x, t);

    let gx = ctx.upload_f32("x", &x, &[t, c]).unwrap();
    let gb = bias.as_ref().map(|b| ctx.upload_f32("bias", b, &[n]).unwrap());
    let gy = ctx.zeros_f32("y", &[t, n]).unwrap();
    run(ctx, "matmul test", |enc| {
        kernels::matmul_nt_with(ctx, enc, &gx, gw, gb.as_ref(), &gy, uniform_x)
    });
    let got = ctx.read_f32(&gy).unwrap();
    let what = format!(
        "matmul {} N={n} C={c} T={t} bias={with_bias} uniform_x={uniform_x}",
        w.dtype
    );
    assert_close(&what, &got, &want, n, 1e-4)
}

#[test]
fn matmul_matches_qlinear_for_each_format_and_shape() {
    let Some(ctx) = ctx() else { return };
    // N is not a multiple of 64 (the kernel's row tile) in every shape.
    for dtype in ALL_DTYPES {
        let mut max_err = MaxErr::default();
        for (i, (&c, n)) in cols_for(dtype).iter().zip([37, 100, 130, 70]).enumerate() {
            let w = weight(dtype, n, c, 100 + i as u64);
            let gw = GpuMatrix::upload(ctx, &w).unwrap();
            assert_eq!(gw.chunk_rows(), vec![(0, n)]);
            // GEMV (T = 1) and GEMM (T > 4), with and without bias.
            for t in [1, 2, 3, 8, 37] {
                max_err = max_err.max(check_matmul(ctx, &w, &gw, t, t % 2 == 1));
            }
        }
        eprintln!("matmul {dtype}: {max_err} (tolerance 1e-4 * (1 + |ref|))");
    }
}

#[test]
fn k_quant_rows_that_are_not_whole_super_blocks_are_rejected() {
    let Some(ctx) = ctx() else { return };
    // 512 values of Q4_K bytes viewed as 2 rows of 256 is fine; as 4 rows of
    // 128 it is not, and the error names the tensor.
    let bytes = quantize(DType::Q4_K, &seeded(512, 3));
    let odd = QTensor::from_bytes("blk.0.ffn_down.weight", DType::Q4_K, vec![4, 128], bytes);
    let err = GpuMatrix::upload(ctx, &odd).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.ffn_down.weight") && err.contains("not whole blocks of 256"),
        "{err}"
    );
}

#[test]
fn matmul_f32_handles_rows_that_are_not_whole_blocks() {
    let Some(ctx) = ctx() else { return };
    // C = 70: two blocks of 32 and a tail of 6 values.
    let w = weight(DType::F32, 65, 70, 5);
    let gw = GpuMatrix::upload(ctx, &w).unwrap();
    let mut max_err = MaxErr::default();
    for t in [1, 3, 8, 37] {
        max_err = max_err.max(check_matmul(ctx, &w, &gw, t, true));
    }
    eprintln!("matmul F32 C=70: {max_err}");
}

#[test]
fn matmul_splits_large_weights_into_chunks() {
    let Some(ctx) = ctx() else { return };
    for dtype in ALL_DTYPES {
        let (n, c) = (200, cols_for(dtype)[1]);
        let w = weight(dtype, n, c, 21);
        // Room for exactly 64 rows (plus the spare word) per chunk.
        let limit = (64 * gpu_row_bytes(dtype, c) + 8) as u64;
        let gw = GpuMatrix::upload_with_chunk_limit(ctx, &w, limit).unwrap();
        assert_eq!(
            gw.chunk_rows(),
            vec![(0, 64), (64, 64), (128, 64), (192, 8)],
            "{dtype} chunks"
        );
        let mut max_err = MaxErr::default();
        for t in [1, 3, 37] {
            max_err = max_err.max(check_matmul(ctx, &w, &gw, t, true));
        }
        eprintln!("chunked matmul {dtype}: {max_err}");
    }
}

/// Streams weights through `WeightStream` the way the browser does (a file
/// that is not in memory, arriving in chunks of odd sizes) and checks that
/// every GPU buffer holds exactly what the in-memory upload writes: for
/// widened F16/BF16 values split inside a value, for Q4_0 rows of 18 bytes
/// that are not word aligned, across several chunk buffers, and with bytes
/// between tensors that belong to no weight.
#[test]
fn streamed_weights_match_resident_uploads_byte_for_byte() {
    use crate::gpu::upload::WeightUpload;
    use crate::tensor::Buffer;
    if ctx().is_none() {
        return;
    }
    let ctx = Arc::new(GpuContext::new(GpuOptions::from_env()).unwrap());
    let tensors = [
        weight(DType::F16, 70, 64, 31),
        weight(DType::Q4_0, 130, 32, 32),
        weight(DType::BF16, 3, 32, 33),
        weight(DType::Q8_0, 65, 64, 34),
    ];
    // A fake file: junk, then each tensor followed by a few junk bytes.
    let mut file = vec![0xAB; 5];
    let mut ranges = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let start = file.len();
        file.extend_from_slice(t.bytes());
        ranges.push(start..file.len());
        file.extend(std::iter::repeat_n(0xCD, i + 1));
    }
    let deferred = Arc::new(Buffer::Deferred { len: file.len() });
    // Room for 64 rows (and the spare word) per chunk buffer.
    let limit = |t: &QTensor| {
        let gpu = if t.dtype.is_quantized() { t.dtype } else { DType::F32 };
        (64 * gpu.bytes_for(t.cols()) + 8) as u64
    };
    let mut up = WeightUpload::default();
    let streamed: Vec<GpuMatrix> = tensors
        .iter()
        .zip(&ranges)
        .map(|(t, r)| {
            let d = QTensor::new(t.name.clone(), t.dtype, t.shape.clone(), deferred.clone(), r.clone());
            assert!(!d.is_resident());
            GpuMatrix::create(&ctx, &d, &mut up, limit(t)).unwrap()
        })
        .collect();
    let mut stream = up.into_stream(ctx.clone()).unwrap();
    let sizes = [3usize, 1, 7, 64, 5, 1000];
    let mut at = 0;
    for i in 0.. {
        if at == file.len() {
            break;
        }
        let n = sizes[i % sizes.len()].min(file.len() - at);
        stream.feed(&file[at..at + n]).unwrap();
        at += n;
    }
    stream.finish().unwrap();
    for (t, s) in tensors.iter().zip(&streamed) {
        let r = GpuMatrix::upload_with_chunk_limit(&ctx, t, limit(t)).unwrap();
        assert_eq!(s.chunk_rows(), r.chunk_rows(), "{}", t.name);
        assert!(
            s.chunks.len() > 1 || t.rows() < 64,
            "{}: the test wants several chunks",
            t.name
        );
        for (a, b) in s.chunks.iter().zip(&r.chunks) {
            let size = b.buffer.size();
            assert_eq!(a.buffer.size(), size, "{}", t.name);
            let got = ctx.read_bytes(&a.buffer, size, "streamed chunk").unwrap();
            let want = ctx.read_bytes(&b.buffer, size, "resident chunk").unwrap();
            assert!(got == want, "{} rows {}..: streamed bytes differ", t.name, a.row0);
        }
    }

    // A stream that stops early names the tensor it stopped in.
    let mut up = WeightUpload::default();
    let t = &tensors[1];
    let d = QTensor::new(
        t.name.clone(),
        t.dtype,
        t.shape.clone(),
        deferred.clone(),
        ranges[1].clone(),
    );
    GpuMatrix::create(&ctx, &d, &mut up, limit(t)).unwrap();
    let mut stream = up.into_stream(ctx.clone()).unwrap();
    stream.feed(&file[..ranges[1].start + 100]).unwrap();
    let err = stream.finish().unwrap_err().to_string();
    assert!(err.contains(&t.name) && err.contains("ended"), "{err}");

    // In-memory uploads refuse a tensor that is not in memory.
    let err = GpuMatrix::upload(&ctx, &d).unwrap_err().to_string();
    assert!(err.contains("not in memory"), "{err}");
}

#[test]
fn matmul_rejects_bad_shapes_without_panicking() {
    let Some(ctx) = ctx() else { return };
    let w = GpuMatrix::upload(ctx, &weight(DType::Q8_0, 40, 64, 3)).unwrap();
    let x = ctx.upload_f32("x", &[0.0; 2 * 32], &[2, 32]).unwrap();
    let y = ctx.zeros_f32("y", &[2, 40]).unwrap();
    let mut enc = ctx.encoder("bad shapes");
    let err = matmul_nt(ctx, &mut enc, &x, &w, None, &y).unwrap_err();
    assert!(err.to_string().contains("expected (T, 64)"), "{err}");
    let x = ctx.upload_f32("x", &[0.0; 2 * 64], &[2, 64]).unwrap();
    let bad_y = ctx.zeros_f32("y", &[3, 40]).unwrap();
    let err = matmul_nt(ctx, &mut enc, &x, &w, None, &bad_y).unwrap_err();
    assert!(err.to_string().contains("expected (2, 40)"), "{err}");
    let bad_bias = ctx.zeros_f32("b", &[39]).unwrap();
    let err = matmul_nt(ctx, &mut enc, &x, &w, Some(&bad_bias), &y).unwrap_err();
    assert!(err.to_string().contains("bias has 39 values"), "{err}");
    // Quantised rows must be whole blocks (80 values hold 2 blocks of bytes).
    let odd = QTensor::from_bytes("odd", DType::Q8_0, vec![2, 40], quantize(DType::Q8_0, &[0.0; 64]));
    let err = GpuMatrix::upload(ctx, &odd).unwrap_err();
    assert!(err.to_string().contains("not whole blocks"), "{err}");
}

#[test]
fn embed_rows_matches_dequantize_row() {
    let Some(ctx) = ctx() else { return };
    let v = 300;
    for dtype in ALL_DTYPES {
        let c = cols_for(dtype)[1];
        let table = weight(dtype, v, c, 31);
        // F32 is exact in every format's embedding path, and so are the
        // 32-value formats (the same f32 operations as the CPU). The
        // K-quants' `d * sc * q - dmin * m` may be fused into one rounding
        // on the GPU, so they get a relative 1e-6.
        let tol = if dtype.block().0 == 256 { 1e-6 } else { 0.0 };
        // Whole and split into 64-row chunks: both must gather the same rows.
        for limit in [None, Some((64 * gpu_row_bytes(dtype, c) + 8) as u64)] {
            let gt = match limit {
                None => GpuMatrix::upload(ctx, &table).unwrap(),
                Some(l) => GpuMatrix::upload_with_chunk_limit(ctx, &table, l).unwrap(),
            };
            for t in [1usize, 3, 8, 37] {
                let ids: Vec<u32> = (0..t)
                    .map(|i| (([0, v - 1, 64, 63, 200][i % 5] + i / 5) % v) as u32)
                    .collect();
                let mut want = vec![0f32; t * c];
                for (row, &id) in want.chunks_mut(c).zip(&ids) {
                    table.dequantize_row(id as usize, row);
                }
                let gids = ctx.upload_u32("ids", &ids, &[t]).unwrap();
                let out = ctx.zeros_f32("out", &[t, c]).unwrap();
                run(ctx, "embed test", |enc| embed_rows(ctx, enc, &gt, &gids, &out));
                let got = ctx.read_f32(&out).unwrap();
                let what = format!("embed {dtype} T={t} chunks={}", gt.chunk_rows().len());
                assert_close(&what, &got, &want, c, tol);
            }
        }
    }
    eprintln!("embed_rows: bit-exact for every 32-value format, within 1e-6 for the K-quants");
}

#[test]
fn rms_norm_rows_matches_cpu() {
    let Some(ctx) = ctx() else { return };
    let eps = 1e-6;
    let mut max_err = MaxErr::default();
    // (rows of x, row length): layer norm on (T, C), per-head norm on
    // (T*H, D), whole-vector q/k norm on (T, H*D).
    for (t, len) in [(1, 64), (3, 200), (37, 576), (8, 4096), (37 * 4, 128), (3, 4 * 128)] {
        let x: Vec<f32> = seeded(t * len, 41).iter().map(|v| v * 3.0).collect();
        let w: Vec<f32> = seeded(len, 43).iter().map(|v| 1.0 + v * 0.5).collect();
        let want = model::rms_norm(&x, &w, eps);
        let gx = ctx.upload_f32("x", &x, &[t, len]).unwrap();
        let gw = ctx.upload_f32("w", &w, &[len]).unwrap();
        let out = ctx.zeros_f32("out", &[t, len]).unwrap();
        run(ctx, "rms_norm test", |enc| {
            rms_norm_rows(ctx, enc, &gx, &gw, &out, len, eps)
        });
        let got = ctx.read_f32(&out).unwrap();
        max_err = max_err.max(assert_close(
            &format!("rms_norm rows={t} len={len}"),
            &got,
            &want,
            len,
            1e-5,
        ));
    }
    eprintln!("rms_norm_rows: {max_err} (tolerance 1e-5 * (1 + |ref|))");
}

#[test]
fn rope_heads_matches_cpu_for_both_pairings() {
    let Some(ctx) = ctx() else { return };
    let mut max_err = MaxErr::default();
    for style in [RopeStyle::NeoX, RopeStyle::Interleaved] {
        for (t, h, d, theta) in [
            (1, 4, 64, 10000.0),
            (3, 2, 128, 1e6),
            (37, 3, 64, 100000.0),
            (8, 1, 8, 10000.0),
        ] {
            let x = seeded(t * h * d, 51);
            // Positions from 0 to large ones, where angle errors would show.
            let pos: Vec<u32> = (0..t as u32)
                .map(|i| [0, 1, 17, 4095, 32767, 131071][i as usize % 6] + i)
                .collect();
            let mut want = x.clone();
            for (ti, &p) in pos.iter().enumerate() {
                for hh in 0..h {
                    let at = (ti * h + hh) * d;
                    model::rope(&mut want[at..at + d], p as usize, theta, style);
                }
            }
            let gx = ctx.upload_f32("x", &x, &[t, h, d]).unwrap();
            let gp = ctx.upload_u32("pos", &pos, &[t]).unwrap();
            run(ctx, "rope test", |enc| {
                rope_heads(ctx, enc, &gx, &gp, h, d, theta, style)
            });
            let got = ctx.read_f32(&gx).unwrap();
            let what = format!("rope {style:?} T={t} H={h} D={d} theta={theta}");
            max_err = max_err.max(assert_close(&what, &got, &want, d, 1e-5));
        }
    }
    eprintln!("rope_heads: {max_err} (tolerance 1e-5 * (1 + |ref|))");
}

#[test]
fn silu_mul_and_add_match_cpu() {
    let Some(ctx) = ctx() else { return };
    let (mut silu_err, mut add_err) = (MaxErr::default(), MaxErr::default());
    for n in [1, 37, 1000, 3 * 1536] {
        let g: Vec<f32> = seeded(n, 61).iter().map(|v| v * 12.0).collect();
        let u = seeded(n, 62);
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let gg = ctx.upload_f32("g", &g, &[n]).unwrap();
        let gu = ctx.upload_f32("u", &u, &[n]).unwrap();
        let gh = ctx.zeros_f32("h", &[n]).unwrap();
        run(ctx, "silu_mul test", |enc| silu_mul(ctx, enc, &gg, &gu, &gh));
        silu_err = silu_err.max(assert_close(
            &format!("silu_mul n={n}"),
            &ctx.read_f32(&gh).unwrap(),
            &want,
            n,
            1e-5,
        ));

        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g + u).collect();
        run(ctx, "add test", |enc| add(ctx, enc, &gg, &gu));
        add_err = add_err.max(assert_close(
            &format!("add n={n}"),
            &ctx.read_f32(&gg).unwrap(),
            &want,
            n,
            0.0,
        ));
    }
    eprintln!("silu_mul: {silu_err} (tolerance 1e-5 * (1 + |ref|)); add: {add_err} (exact)");
}

#[test]
fn elementwise_grid_folds_past_65535_workgroups() {
    let Some(ctx) = ctx() else { return };
    // 65535 * 256 + 1000 values need a second row of workgroups.
    let n = 65535 * 256 + 1000;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let y: Vec<f32> = (0..n).map(|i| (i / 1000) as f32).collect();
    let gx = ctx.upload_f32("x", &x, &[n]).unwrap();
    let gy = ctx.upload_f32("y", &y, &[n]).unwrap();
    run(ctx, "big add", |enc| add(ctx, enc, &gx, &gy));
    let got = ctx.read_f32(&gx).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_close("add n=16.8M", &got, &want, n, 0.0);
}

#[test]
fn pipeline_cache_reuses_equal_keys_only() {
    let Some(ctx) = ctx() else { return };
    let binds = [
        Bind::Uniform,
        Bind::StorageRead,
        Bind::StorageRead,
        Bind::StorageRead,
        Bind::StorageReadWrite,
    ];
    let spec = |tile: u32| {
        ShaderSpec::new("matmul_nt_wq.wgsl", "main")
            .include("dequant_common.wgsl")
            .include("dequant_q4_1.wgsl")
            .include("matmul_x_storage.wgsl")
            .define_u32("WG_ROWS", 64)
            .define_u32("TILE_T", tile)
    };
    let a = ctx.kernel(&spec(2), &binds).unwrap();
    let b = ctx.kernel(&spec(2), &binds).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "same key, same pipeline");
    // Defines given in another order make the same key.
    let reordered = ShaderSpec::new("matmul_nt_wq.wgsl", "main")
        .include("dequant_common.wgsl")
        .include("dequant_q4_1.wgsl")
        .include("matmul_x_storage.wgsl")
        .define("TILE_T", DefineValue::U32(2))
        .define_u32("WG_ROWS", 64);
    assert_eq!(reordered, spec(2));
    assert!(Arc::ptr_eq(&a, &ctx.kernel(&reordered, &binds).unwrap()));
    let c = ctx.kernel(&spec(4), &binds).unwrap();
    assert!(!Arc::ptr_eq(&a, &c), "different defines, different pipelines");
    assert_eq!(
        spec(4).define_list(),
        vec!["TILE_T=4u".to_string(), "WG_ROWS=64u".to_string()]
    );
    assert!(ctx.pipelines.len() >= 2);
}

#[test]
fn shader_errors_come_back_as_gpu_errors() {
    let Some(ctx) = ctx() else { return };
    // The matmul kernel without its TILE_T define does not compile.
    let spec = ShaderSpec::new("matmul_nt_wq.wgsl", "main")
        .include("dequant_common.wgsl")
        .include("dequant_q8_0.wgsl")
        .include("matmul_x_storage.wgsl")
        .define_u32("WG_ROWS", 64);
    let binds = [
        Bind::Uniform,
        Bind::StorageRead,
        Bind::StorageRead,
        Bind::StorageRead,
        Bind::StorageReadWrite,
    ];
    let err = ctx.kernel(&spec, &binds).unwrap_err();
    assert!(matches!(err, crate::Error::Gpu(_)), "{err:?}");
    assert!(err.to_string().contains("matmul_nt_wq.wgsl"), "{err}");
}

#[test]
fn adapter_filter_that_matches_nothing_is_a_clear_error() {
    if ctx().is_none() {
        return;
    }
    let opts = GpuOptions {
        adapter_name: Some("no-such-adapter-xyz".into()),
        ..GpuOptions::default()
    };
    let err = GpuContext::new(opts).unwrap_err().to_string();
    assert!(
        err.contains("no adapter name contains `no-such-adapter-xyz`; available:"),
        "{err}"
    );
}

/// Not a test: prints the matmul benchmark figures. Run with
/// `cargo test -p lynx --lib gpu::tests::bench -- --ignored --nocapture`
/// (with `LYNX_BENCH_QUICK=1` for Q8_0 only).
#[test]
#[ignore]
fn bench() {
    let Some(ctx) = ctx() else { return };
    let (n, c) = (4096, 4096);
    let quick = std::env::var("LYNX_BENCH_QUICK").is_ok();
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::F32] {
        if quick && dtype != DType::Q8_0 {
            continue;
        }
        for t in [1, 4, 8, 64] {
            let (s, gbs) = bench_matmul(ctx, dtype, n, c, t, 10).unwrap();
            let (cs, cgbs) = bench_cpu_matmul(dtype, n, c, t, 10);
            eprintln!(
                "{dtype} {n}x{c} T={t}: GPU {:.2} ms {gbs:.2} GB/s | CPU (rayon) {:.2} ms {cgbs:.2} GB/s",
                s * 1e3,
                cs * 1e3
            );
        }
    }
}

/// Not a test: GPU-only GEMV/GEMM timings of every quant format on one
/// shape, for comparing decoders (and an interface change) as ratios. Run
/// with `cargo test -p lynx --lib gpu::tests::bench_formats -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_formats() {
    let Some(ctx) = ctx() else { return };
    let (n, c) = (2048, 4096);
    for dtype in DType::ALL.into_iter().filter(|d| d.is_quantized()) {
        for t in [1, 8] {
            let (s, gbs) = bench_matmul(ctx, dtype, n, c, t, 20).unwrap();
            eprintln!("{dtype} {n}x{c} T={t}: GPU {:.3} ms {gbs:.2} GB/s", s * 1e3);
        }
    }
}
