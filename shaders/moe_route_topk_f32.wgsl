// moe_route_topk_f32.wgsl — router logits to each token's K experts and weights.
//
// Purpose: the exact routing of model::route on the GPU. For token t:
//   probs = softmax(logits[t])                       # F.softmax(router_logits, dim=-1, dtype=torch.float)
//   w, ids = topk(probs, K)                          # torch.topk(routing_weights, top_k, dim=-1)
//   if renormalize: w /= sum(w)                      # routing_weights /= routing_weights.sum(-1, keepdim=True)
// Ties go to the lower expert index, and slots are in descending weight, as
// on the CPU. The result is the explicit routing buffer that a selection
// policy may rewrite before moe_group_u32.wgsl groups tokens by expert.
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  logits   array<f32>: (T, E) router logits
//   2 storage rw ids      array<u32>: (T, K) chosen experts, best first
//   3 storage rw weights  array<f32>: (T, K) their routing weights
//
// Workgroup: (64, 1, 1); one invocation per token, t = (wid.x + wid.y * groups_x) * 64 + lid.x.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(T / 64).
// Limits: K <= MAX_K (the host checks it).

struct Params {
    t: u32,
    e: u32,
    k: u32,
    renormalize: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const MAX_K: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> weights: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.x + wid.y * p.groups_x) * 64u + lid.x;
    if t >= p.t {
        return;
    }
    let base = t * p.e;
    // Softmax denominators, with the max subtracted first as model::softmax does.
    var m = logits[base];
    for (var e = 1u; e < p.e; e++) {
        m = max(m, logits[base + e]);
    }
    var sum = 0.0;
    for (var e = 0u; e < p.e; e++) {
        sum += exp(logits[base + e] - m);
    }
    // Selection by repeated arg-max over the experts not yet taken. The
    // ranking uses the logits (softmax is monotonic, so it is the same as
    // ranking probabilities, and exact ties stay ties). K is small, so
    // O(K * E) per token is cheap; `taken` is a bit set over experts.
    var taken: array<u32, 8>;  // up to 256 experts
    var chosen: array<u32, MAX_K>;
    var w: array<f32, MAX_K>;
    var wsum = 0.0;
    for (var k = 0u; k < p.k; k++) {
        var best = 0xFFFFFFFFu;
        var best_v = 0.0;
        for (var e = 0u; e < p.e; e++) {
            if (taken[e >> 5u] & (1u << (e & 31u))) != 0u {
                continue;
            }
            let v = logits[base + e];
            if best == 0xFFFFFFFFu || v > best_v {
                best = e;
                best_v = v;
            }
        }
        taken[best >> 5u] |= 1u << (best & 31u);
        chosen[k] = best;
        w[k] = exp(best_v - m) / sum;
        wsum += w[k];
    }
    for (var k = 0u; k < p.k; k++) {
        var v = w[k];
        if p.renormalize != 0u {
            v = v / wsum;
        }
        ids[t * p.k + k] = chosen[k];
        weights[t * p.k + k] = v;
    }
}
