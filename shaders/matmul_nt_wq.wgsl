// matmul_nt_wq.wgsl — y = x · Wᵀ (+ bias) with W in its stored format.
//
// Purpose: every linear layer, as GEMV (decode, T = 1..64) and GEMM (prefill,
// T up to hundreds). "wq" = the weight format is chosen when the pipeline is
// built: the host prepends dequant_common.wgsl and one dequant_<format>.wgsl
// (f32, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k), which
// define w_block(row, b) (32-value block b of a row) and w_value,
// and one of matmul_x_storage.wgsl / matmul_x_uniform.wgsl, which declare
// binding 2 (x) and its reader `x4(i)` (the i-th vec4 of x).
// Weights are dequantised in registers, one 32-value block at a time, and the
// dot products accumulate in f32, like linear::QLinear::forward.
//
// Defines: WG_ROWS (invocations per workgroup, one weight row each),
//          TILE_T (tokens per invocation: 1, 2 or 4),
//          X_VEC4S (uniform x only: the length of x in vec4s).
//
// Bindings (group 0):
//   0 uniform    p     Params (below)
//   1 storage r  w     array<u32>: rows [row0, row0 + rows) of W (N, C), raw bytes
//   2 storage r  x     array<vec4<f32>>: (T, C), or uniform array<vec4<f32>, X_VEC4S>
//   3 storage r  bias  array<f32>: (N), read only when p.has_bias != 0
//   4 storage rw y     array<f32>: (T, N); this dispatch writes columns [row0, row0 + rows)
//
// Workgroup: (WG_ROWS, 1, 1); invocation lid.x owns weight row
//   r = (wid.x + wid.z * groups_x) * WG_ROWS + lid.x of the chunk, and tokens
//   t_base + [wid.y * TILE_T, wid.y * TILE_T + TILE_T) of the window.
// Grid: (min(G, 65535), ceil(Tw / TILE_T), ceil(G / 65535)) with
//   G = ceil(rows / WG_ROWS) and Tw = p.t the tokens of the window; the host
//   dispatches once per weight chunk and window of x (storage x: one window
//   of all T tokens; uniform x: windows of up to 64 KiB).
//
// Each invocation streams its own weight row once and reuses each decoded
// block for TILE_T tokens; the activations it reads are the same for the
// whole workgroup. That is the layout that is fastest on lavapipe (one row
// per invocation, u32 loads) and is a reasonable portable baseline on GPUs.

struct Params {
    t: u32,          // tokens in this dispatch's window of x
    c: u32,          // in features C
    n: u32,          // out features N of the whole matrix (row stride of y)
    row0: u32,       // first weight row of this chunk
    rows: u32,       // weight rows in this chunk
    row_bytes: u32,  // bytes per weight row
    has_bias: u32,
    groups_x: u32,   // workgroups along x
    t_base: u32,     // first token of the window: x holds tokens [t_base, t_base + t) of y
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// The dot product of one decoded block with 32 values of x starting at vec4 index xo.
fn block_dot(wb: array<vec4<f32>, 8>, xo: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        s += wb[j] * x4(xo + j);
    }
    return (s.x + s.y) + (s.z + s.w);
}

// Value i of x (an element index).
fn x1(i: u32) -> f32 {
    return x4(i >> 2u)[i & 3u];
}

// Token j of the tile, clamped to the window: tokens past its end (in the
// last tile) re-read the last token, so the loops need no bounds checks;
// their results are never stored.
fn token_row(t0: u32, j: u32) -> u32 {
    return min(t0 + j, p.t - 1u) * p.c;
}

fn store(t0: u32, j: u32, col: u32, v: f32) {
    if t0 + j < p.t {
        y[(p.t_base + t0 + j) * p.n + col] = v;
    }
}

@compute @workgroup_size(WG_ROWS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wid.x + wid.z * p.groups_x) * WG_ROWS + lid.x;
    if r >= p.rows {
        return;
    }
    let t0 = wid.y * TILE_T;
    let row = r * p.row_bytes;

    // One accumulator per token of the tile, as separate variables: arrays
    // indexed by a loop counter may end up in memory (lavapipe's compiler
    // does not always unroll such loops), scalars stay in registers. The
    // `TILE_T > n` conditions are constants, so unused tokens compile away.
    let x0 = token_row(t0, 0u);
    let x1r = token_row(t0, 1u);
    let x2 = token_row(t0, 2u);
    let x3 = token_row(t0, 3u);
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;

    // Whole blocks read x as vec4s, which needs 4-aligned rows of x; rows
    // of other lengths (f32 weights only) go through the scalar tail loop.
    let nb = select(0u, p.c / 32u, p.c % 4u == 0u);
    for (var b = 0u; b < nb; b++) {
        let wb = w_block(row, b);
        let xb = b * 32u;
        a0 += block_dot(wb, (x0 + xb) >> 2u);
        if TILE_T > 1u {
            a1 += block_dot(wb, (x1r + xb) >> 2u);
        }
        if TILE_T > 2u {
            a2 += block_dot(wb, (x2 + xb) >> 2u);
            a3 += block_dot(wb, (x3 + xb) >> 2u);
        }
    }
    // Tail: only f32 weights can have C % 32 != 0.
    for (var k = nb * 32u; k < p.c; k++) {
        let wv = w_value(row, k);
        a0 += wv * x1(x0 + k);
        if TILE_T > 1u {
            a1 += wv * x1(x1r + k);
        }
        if TILE_T > 2u {
            a2 += wv * x1(x2 + k);
            a3 += wv * x1(x3 + k);
        }
    }

    let col = p.row0 + r;
    var b = 0.0;
    if p.has_bias != 0u {
        b = bias[col];
    }
    store(t0, 0u, col, a0 + b);
    if TILE_T > 1u {
        store(t0, 1u, col, a1 + b);
    }
    if TILE_T > 2u {
        store(t0, 2u, col, a2 + b);
        store(t0, 3u, col, a3 + b);
    }
}
