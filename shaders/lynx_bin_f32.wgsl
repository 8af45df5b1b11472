// lynx_bin_f32.wgsl — AffinityBinning: the bin of each of a token's K choices.
//
// Purpose: for token t and slot k with expert e = ids[t, k],
//   g = logits[t, e] - max_e' logits[t, e']          (the affinity gap, <= 0)
//   bin = clamp(floor(alpha * g), -beta, 0)          (0 = highest affinity)
// as selection::bin computes it. The bins are written to the step's policy
// log (read by metrics, never by the host on the hot path) and read by
// lynx_score_f32.wgsl.
//
// Bindings (group 0):
//   0 uniform    p       Params (below)
//   1 storage r  logits  array<f32>: (T, E) router logits
//   2 storage r  ids     array<u32>: (T, K) exact routing, best first
//   3 storage rw log     array<i32>: policy log; this layer's bins are at
//                        log[p.log_base + 1 + t * K + k]
//
// Workgroup: (64, 1, 1); one invocation per token t = wid.x * 64 + lid.x.
// Grid: (ceil(T / 64), 1, 1).

struct Params {
    t: u32,
    e: u32,
    k: u32,
    beta: u32,
    alpha: f32,
    log_base: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> log: array<i32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = wid.x * 64u + lid.x;
    if t >= p.t {
        return;
    }
    let base = t * p.e;
    var m = logits[base];
    for (var e = 1u; e < p.e; e++) {
        m = max(m, logits[base + e]);
    }
    for (var k = 0u; k < p.k; k++) {
        let g = logits[base + ids[t * p.k + k]] - m;
        let b = clamp(floor(p.alpha * g), -f32(p.beta), 0.0);
        log[p.log_base + 1u + t * p.k + k] = i32(b);
    }
}
