// moe_combine_f32.wgsl — weighted sum of each token's expert outputs, plus
// the optional shared expert, added into the residual stream.
//
// Purpose: for token t and feature c,
//   s = sum over r in 0..K of order_w[t, r] * y[order[t, r], c]
//         # final_hidden_states.index_add_(0, top_x, current_hidden_states * routing_weights)
//   if shared: s += sigmoid(gate[t]) * shared[t, c]
//         # F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
//   x[t, c] += s                                    # the residual add
// `order` lists a token's grouped positions in ascending expert id (see
// moe_group_u32.wgsl), so the sum runs in the same order as the CPU
// reference, which loops over experts by index.
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage rw x        array<f32>: (T, C) residual stream, updated in place
//   2 storage r  y        array<f32>: (T * K, C) expert outputs, grouped order
//   3 storage r  order    array<u32>: (T, K)
//   4 storage r  order_w  array<f32>: (T, K)
//   5 storage r  shared   array<f32>: (T, C), read only when p.has_shared != 0
//   6 storage r  gate     array<f32>: (T), read only when p.has_shared != 0
//
// Workgroup: (256, 1, 1); one invocation per (t, c), i = (wid.x + wid.y * groups_x) * 256 + lid.x.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(T * C / 256).

struct Params {
    t: u32,
    c: u32,
    k: u32,
    has_shared: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> order: array<u32>;
@group(0) @binding(4) var<storage, read> order_w: array<f32>;
@group(0) @binding(5) var<storage, read> shared_out: array<f32>;
@group(0) @binding(6) var<storage, read> gate: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if i >= p.t * p.c {
        return;
    }
    let t = i / p.c;
    let c = i % p.c;
    var s = 0.0;
    for (var r = 0u; r < p.k; r++) {
        s += order_w[t * p.k + r] * y[order[t * p.k + r] * p.c + c];
    }
    if p.has_shared != 0u {
        let g = 1.0 / (1.0 + exp(-gate[t]));
        s += g * shared_out[i];
    }
    x[i] = x[i] + s;
}
