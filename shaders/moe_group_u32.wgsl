// moe_group_u32.wgsl — group a batch's (token, slot) assignments by expert.
//
// Purpose: turn the routing buffer ids (T, K) into per-expert token lists, so
// the expert matmuls (moe_matmul_nt_wq.wgsl) read each active expert's
// weights once for all the tokens routed to it. Assignment a = t * K + k is
// "token t's k-th slot". Outputs:
//   offsets[e] .. offsets[e + 1]   the range of grouped positions of expert e
//                                  (offsets[E] = T * K); counts come for free;
//   list[j]                        the assignment at grouped position j;
//                                  within an expert, in ascending token order;
//   order[t * K + r]               the grouped position of token t's r-th
//                                  assignment in ascending *expert* order, so
//                                  moe_combine_f32.wgsl sums a token's expert
//                                  outputs in expert-index order like the CPU
//                                  reference (and transformers' expert loop);
//   order_w[t * K + r]             the routing weight that goes with it.
//   n_active[0]                    the number of experts with at least one token.
// The result does not depend on scheduling: every list is built by one
// invocation scanning the assignments in order.
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  ids      array<u32>: (T, K)
//   2 storage r  weights  array<f32>: (T, K)
//   3 storage rw offsets  array<u32>: (E + 1)
//   4 storage rw list     array<u32>: (T * K)
//   5 storage rw order    array<u32>: (T, K)
//   6 storage rw order_w  array<f32>: (T, K)
//   7 storage rw n_active array<u32>: (1)
//
// Workgroup: (256, 1, 1), and the grid is a single workgroup (1, 1, 1): the
//   phases are separated by barriers, which only synchronise one workgroup.
//   Cost O(E * T * K / 256 + T * K * K / 256): small next to the expert matmuls.

struct Params {
    t: u32,
    e: u32,
    k: u32,
    _pad0: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> offsets: array<u32>;
@group(0) @binding(4) var<storage, read_write> list: array<u32>;
@group(0) @binding(5) var<storage, read_write> order: array<u32>;
@group(0) @binding(6) var<storage, read_write> order_w: array<f32>;
@group(0) @binding(7) var<storage, read_write> n_active: array<u32>;

// Grouped position of each assignment, filled in phase 3, read in phase 4.
// Held in `order` itself until phase 4 rewrites it in expert order; phase 4
// therefore reads a copy made per token first.

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
    let n = p.t * p.k;
    // Phase 1: counts per expert, into offsets[e + 1].
    for (var e = lid.x; e < p.e; e += WG) {
        var c = 0u;
        for (var a = 0u; a < n; a++) {
            c += select(0u, 1u, ids[a] == e);
        }
        offsets[e + 1u] = c;
    }
    storageBarrier();
    workgroupBarrier();
    // Phase 2: exclusive prefix sum (E is at most a few hundred).
    if lid.x == 0u {
        offsets[0] = 0u;
        var run = 0u;
        var act = 0u;
        for (var e = 0u; e < p.e; e++) {
            let c = offsets[e + 1u];
            act += select(0u, 1u, c > 0u);
            run += c;
            offsets[e + 1u] = run;
        }
        n_active[0] = act;
    }
    storageBarrier();
    workgroupBarrier();
    // Phase 3: fill each expert's list in token order, and note each
    // assignment's grouped position in `order` (slot order for now).
    for (var e = lid.x; e < p.e; e += WG) {
        var j = offsets[e];
        for (var a = 0u; a < n; a++) {
            if ids[a] == e {
                list[j] = a;
                order[a] = j;
                j++;
            }
        }
    }
    storageBarrier();
    workgroupBarrier();
    // Phase 4: per token, sort its K slots by expert id (insertion sort: K
    // is small) and write positions and weights in that order.
    for (var t = lid.x; t < p.t; t += WG) {
        let base = t * p.k;
        var pos: array<u32, 32>;
        var eid: array<u32, 32>;
        var w: array<f32, 32>;
        for (var k = 0u; k < p.k; k++) {
            let e = ids[base + k];
            let q = order[base + k];
            let wk = weights[base + k];
            var i = k;
            while i > 0u && eid[i - 1u] > e {
                eid[i] = eid[i - 1u];
                pos[i] = pos[i - 1u];
                w[i] = w[i - 1u];
                i--;
            }
            eid[i] = e;
            pos[i] = q;
            w[i] = wk;
        }
        for (var k = 0u; k < p.k; k++) {
            order[base + k] = pos[k];
            order_w[base + k] = w[k];
        }
    }
}
