// moe_matmul_nt_wq.wgsl — the routed experts' matmuls, grouped by expert.
//
// Purpose: for every expert e and every grouped position j of e (see
// moe_group_u32.wgsl), y[j] = x_row(j) · W_eᵀ, with W the stacked expert
// weights (E, N, C) in their stored format. Only experts that received
// tokens do any work: a workgroup whose expert has fewer tokens than its
// token tile start returns before reading a single weight, so the weight
// bytes read per step scale with the number of distinct experts the batch
// touches, not with T * K. Each workgroup streams its weight rows once for
// TILE_T tokens, as matmul_nt_wq.wgsl does.
//   gather = 1 (gate/up projections): x_row(j) = x[list[j] / K], the token's
//     hidden state (x is (T, C));
//   gather = 0 (down projection): x_row(j) = x[j], the expert's own
//     intermediate activations (x is (T * K, C), in grouped order).
// The host prepends dequant_common.wgsl and one dequant_<format>.wgsl.
//
// Defines: WG_ROWS (invocations per workgroup, one weight row each),
//          TILE_T (grouped tokens per invocation: 1, 2 or 4).
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  w        array<u32>: experts [e0, e0 + experts) of W (E, N, C), raw bytes
//   2 storage r  x        array<vec4<f32>>: (T, C) if gather, else (T * K, C)
//   3 storage r  offsets  array<u32>: (E + 1)
//   4 storage r  list     array<u32>: (T * K) assignment t * K + k per grouped position
//   5 storage rw y        array<f32>: (T * K, N), grouped order
//
// Workgroup: (WG_ROWS, 1, 1); invocation lid.x owns row r = wid.x * WG_ROWS + lid.x
//   of expert e = e0 + wid.z, and grouped tokens offsets[e] + tile * TILE_T + [0, TILE_T) for tiles wid.y, wid.y + gridY, ...
// Grid: (ceil(N / WG_ROWS), ceil(T / TILE_T), experts in this chunk); a
//   workgroup loops over token tiles with stride gridY * TILE_T, so experts
//   with more than T grouped positions (padded slots) are covered too.

struct Params {
    c: u32,            // in features C
    n: u32,            // out features N per expert
    e0: u32,           // first expert of this weight chunk
    row_bytes: u32,    // bytes per weight row
    expert_bytes: u32, // bytes per expert: N * row_bytes
    gather: u32,
    k: u32,            // K, to turn an assignment into its token
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read> list: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

fn block_dot(wb: array<vec4<f32>, 8>, xo: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        s += wb[j] * x[xo + j];
    }
    return (s.x + s.y) + (s.z + s.w);
}

// Value i of x (an element index).
fn xs(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

// Element offset of the x row for grouped position j.
fn x_row(j: u32) -> u32 {
    if p.gather != 0u {
        return (list[j] / p.k) * p.c;
    }
    return j * p.c;
}

@compute @workgroup_size(WG_ROWS)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let e = p.e0 + wid.z;
    let first = offsets[e];
    let count = offsets[e + 1u] - first;
    let r = wid.x * WG_ROWS + lid.x;
    if r >= p.n {
        return;
    }
    // Token tiles wid.y, wid.y + nwg.y, ...: one pass for the usual case of
    // at most T tokens per expert, and still every token when a policy pads
    // a token's unused slots with an expert it already has (up to T * K).
    // The loop bound is uniform for the workgroup: experts without tokens
    // (or with fewer than this tile's start) cost nothing but this check.
    for (var t0 = wid.y * TILE_T; t0 < count; t0 += nwg.y * TILE_T) {
        tile(e, first, count, t0, r);
    }
}

fn tile(e: u32, first: u32, count: u32, t0: u32, r: u32) {
    let row = (e - p.e0) * p.expert_bytes + r * p.row_bytes;
    // Tokens past the expert's count re-read its last token (no bounds
    // checks in the loop); their results are not stored.
    let last = count - 1u;
    let j0 = first + min(t0, last);
    let j1 = first + min(t0 + 1u, last);
    let j2 = first + min(t0 + 2u, last);
    let j3 = first + min(t0 + 3u, last);
    let x0 = x_row(j0);
    let x1 = x_row(j1);
    let x2 = x_row(j2);
    let x3 = x_row(j3);
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    // Whole blocks read x as vec4s, which needs 4-aligned rows; other row
    // lengths (f32 weights only) go through the scalar tail loop.
    let nb = select(0u, p.c / 32u, p.c % 4u == 0u);
    for (var b = 0u; b < nb; b++) {
        let wb = w_block(row, b);
        let xb = b * 32u;
        a0 += block_dot(wb, (x0 + xb) >> 2u);
        if TILE_T > 1u {
            a1 += block_dot(wb, (x1 + xb) >> 2u);
        }
        if TILE_T > 2u {
            a2 += block_dot(wb, (x2 + xb) >> 2u);
            a3 += block_dot(wb, (x3 + xb) >> 2u);
        }
    }
    for (var i = nb * 32u; i < p.c; i++) {
        let wv = w_value(row, i);
        a0 += wv * xs(x0 + i);
        if TILE_T > 1u {
            a1 += wv * xs(x1 + i);
        }
        if TILE_T > 2u {
            a2 += wv * xs(x2 + i);
            a3 += wv * xs(x3 + i);
        }
    }
    y[j0 * p.n + r] = a0;
    if TILE_T > 1u && t0 + 1u < count {
        y[j1 * p.n + r] = a1;
    }
    if TILE_T > 2u {
        if t0 + 2u < count {
            y[j2 * p.n + r] = a2;
        }
        if t0 + 3u < count {
            y[j3 * p.n + r] = a3;
        }
    }
}
