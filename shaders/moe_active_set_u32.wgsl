// moe_active_set_u32.wgsl — the set of experts a decode step loads.
//
// Purpose: decide which experts are active for a batch-aware policy
// (selection::select_cpu), and count the distinct experts of the exact
// routing for the metrics log.
//   mode 0 (Lynx): active = every token's top-1 expert, plus experts with
//     score >= tau (= B^threshold_bin), plus, while fewer than K are
//     active, the inactive expert with the highest score (ties to the
//     lower index);
//   mode 1 (OEA): active = the union of every token's first `keep` slots;
//   mode 2 (top-N): no expert is active beyond the kept slots.
//
// Bindings (group 0):
//   0 uniform    p       Params (below)
//   1 storage r  ids     array<u32>: (T, K) exact routing
//   2 storage r  score   array<f32>: (E) (mode 0)
//   3 storage r  top1    array<u32>: (E) (mode 0)
//   4 storage rw is_active array<u32>: (E) 1 = active
//   5 storage rw log     array<u32>: log[p.log_base] = distinct experts of the exact routing
//
// Workgroup: (1, 1, 1) and grid (1, 1, 1): a serial pass over E and T * K,
//   tiny next to the expert matmuls and free of synchronisation.

struct Params {
    t: u32,
    e: u32,
    k: u32,
    mode: u32,
    keep: u32,
    tau: f32,
    log_base: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> score: array<f32>;
@group(0) @binding(3) var<storage, read> top1: array<u32>;
@group(0) @binding(4) var<storage, read_write> is_active: array<u32>;
@group(0) @binding(5) var<storage, read_write> log: array<u32>;

@compute @workgroup_size(1)
fn main() {
    // Distinct experts of the exact routing: mark them in `active` first.
    for (var e = 0u; e < p.e; e++) {
        is_active[e] = 0u;
    }
    for (var a = 0u; a < p.t * p.k; a++) {
        is_active[ids[a]] = 1u;
    }
    var distinct = 0u;
    for (var e = 0u; e < p.e; e++) {
        distinct += is_active[e];
        is_active[e] = 0u;
    }
    log[p.log_base] = distinct;

    if p.mode == 0u {
        var count = 0u;
        for (var e = 0u; e < p.e; e++) {
            let on = top1[e] != 0u || score[e] >= p.tau;
            is_active[e] = select(0u, 1u, on);
            count += is_active[e];
        }
        let want = min(p.k, p.e);
        while count < want {
            var best = 0xFFFFFFFFu;
            for (var e = 0u; e < p.e; e++) {
                if is_active[e] == 0u && (best == 0xFFFFFFFFu || score[e] > score[best]) {
                    best = e;
                }
            }
            is_active[best] = 1u;
            count++;
        }
    } else if p.mode == 1u {
        for (var t = 0u; t < p.t; t++) {
            for (var s = 0u; s < p.keep; s++) {
                is_active[ids[t * p.k + s]] = 1u;
            }
        }
    }
}
