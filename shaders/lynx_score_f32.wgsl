// lynx_score_f32.wgsl — AffinityBinning batch scores.
//
// Purpose: score[e] = sum over assignments (t, k) with ids[t, k] == e of
// B^bin(t, k), for a batch of B = T tokens (selection::select_cpu). B^bin is
// computed as inv_b multiplied -bin times (inv_b = 1/B from the host):
// WGSL multiplication is correctly rounded, so the scores are bit-identical
// to the CPU oracle's, which sums in the same (token, slot) order. Also
// marks each token's top-1 expert.
//
// Bindings (group 0):
//   0 uniform    p       Params (below)
//   1 storage r  ids     array<u32>: (T, K) exact routing
//   2 storage r  log     array<i32>: the bins at log[p.log_base + 1 + a]
//   3 storage rw score   array<f32>: (E)
//   4 storage rw top1    array<u32>: (E) 1 if some token's top-1 is e
//
// Workgroup: (64, 1, 1); one invocation per expert e = wid.x * 64 + lid.x.
// Grid: (ceil(E / 64), 1, 1).

struct Params {
    t: u32,
    e: u32,
    k: u32,
    log_base: u32,
    inv_b: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> log: array<i32>;
@group(0) @binding(3) var<storage, read_write> score: array<f32>;
@group(0) @binding(4) var<storage, read_write> top1: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = wid.x * 64u + lid.x;
    if e >= p.e {
        return;
    }
    var s = 0.0;
    var first = 0u;
    for (var a = 0u; a < p.t * p.k; a++) {
        if ids[a] == e {
            var w = 1.0;
            for (var b = log[p.log_base + 1u + a]; b < 0; b++) {
                w = w * p.inv_b;
            }
            s += w;
            if a % p.k == 0u {
                first = 1u;
            }
        }
    }
    score[e] = s;
    top1[e] = first;
}
