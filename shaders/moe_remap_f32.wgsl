// moe_remap_f32.wgsl — rewrite each token's routing onto the active experts.
//
// Purpose: the last step of every batch-aware policy
// (selection::select_cpu / remap_cpu). Token t keeps its first `keep`
// exact slots, then fills the remaining slots with its highest-affinity
// active experts not yet taken (ties to the lower index). Slots nothing can
// fill repeat its top-1 expert with weight 0, so they load no new expert
// and add nothing. Weights are the softmax probabilities of the new
// experts, renormalised when the architecture renormalises:
//   probs = softmax(logits[t]);  w = probs[new_ids];  if renormalize: w /= sum(w)
// The routing buffer (ids, weights) is rewritten in place; the remapped
// flag of each slot goes to the policy log.
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  logits   array<f32>: (T, E)
//   2 storage rw ids      array<u32>: (T, K) in: exact, out: selected
//   3 storage rw weights  array<f32>: (T, K) out: the new routing weights
//   4 storage r  is_active array<u32>: (E)
//   5 storage rw log      array<u32>: remapped flags at log[p.log_base + 1 + T * K + t * K + k]
//
// Workgroup: (64, 1, 1); one invocation per token t = wid.x * 64 + lid.x.
// Grid: (ceil(T / 64), 1, 1). Limits: E <= 256, K <= 32.

struct Params {
    t: u32,
    e: u32,
    k: u32,
    keep: u32,
    renormalize: u32,
    log_base: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> weights: array<f32>;
@group(0) @binding(4) var<storage, read> is_active: array<u32>;
@group(0) @binding(5) var<storage, read_write> log: array<u32>;

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
    var sum = 0.0;
    for (var e = 0u; e < p.e; e++) {
        sum += exp(logits[base + e] - m);
    }
    var exact: array<u32, 32>;
    var chosen: array<u32, 32>;
    var taken: array<u32, 8>;
    for (var s = 0u; s < p.k; s++) {
        exact[s] = ids[t * p.k + s];
    }
    var filled = 0u;
    for (var s = 0u; s < min(p.keep, p.k); s++) {
        chosen[s] = exact[s];
        taken[exact[s] >> 5u] |= 1u << (exact[s] & 31u);
        filled++;
    }
    loop {
        if filled >= p.k {
            break;
        }
        var best = 0xFFFFFFFFu;
        var best_v = 0.0;
        for (var e = 0u; e < p.e; e++) {
            if is_active[e] == 0u || (taken[e >> 5u] & (1u << (e & 31u))) != 0u {
                continue;
            }
            let v = logits[base + e];
            if best == 0xFFFFFFFFu || v > best_v {
                best = e;
                best_v = v;
            }
        }
        if best == 0xFFFFFFFFu {
            break;
        }
        taken[best >> 5u] |= 1u << (best & 31u);
        chosen[filled] = best;
        filled++;
    }
    var w: array<f32, 32>;
    var wsum = 0.0;
    for (var s = 0u; s < filled; s++) {
        w[s] = exp(logits[base + chosen[s]] - m) / sum;
        wsum += w[s];
    }
    for (var s = 0u; s < p.k; s++) {
        var id = chosen[0];
        var v = 0.0;
        if s < filled {
            id = chosen[s];
            v = w[s];
            if p.renormalize != 0u {
                v = v / wsum;
            }
        }
        ids[t * p.k + s] = id;
        weights[t * p.k + s] = v;
        let changed = id != exact[s] || s >= filled;
        log[p.log_base + 1u + p.t * p.k + t * p.k + s] = select(0u, 1u, changed);
    }
}
