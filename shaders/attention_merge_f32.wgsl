// attention_merge_f32.wgsl — combine the splits of attention_split_f32.wgsl.
//
// Purpose: for query token t and head h, with per-split states (m_s, l_s, o_s):
//   M = max_s m_s,  L = sum_s l_s * exp(m_s - M),  out = sum_s o_s * exp(m_s - M) / L
// which is the softmax-weighted sum of values over the whole visible range.
// The output is laid out (T, H * D), the input of o_proj.
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  part_o   array<f32>: (T, H, splits, D)
//   2 storage r  part_ml  array<vec2<f32>>: (T, H, splits)
//   3 storage rw out      array<f32>: (T, H * D)
//
// Workgroup: (64, 1, 1); one workgroup per (t, h) = wid.x + wid.y * groups_x,
//   invocations stride over D.
// Grid: (min(T * H, 65535), ceil(T * H / 65535), 1).

struct Params {
    th: u32,       // T * H
    d: u32,
    splits: u32,
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part_o: array<f32>;
@group(0) @binding(2) var<storage, read> part_ml: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let th = wid.x + wid.y * p.groups_x;
    if th >= p.th {
        return;
    }
    let base = th * p.splits;
    var mx = part_ml[base].x;
    for (var s = 1u; s < p.splits; s++) {
        mx = max(mx, part_ml[base + s].x);
    }
    var l = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let ml = part_ml[base + s];
        l += ml.y * exp(ml.x - mx);
    }
    let inv = 1.0 / l;
    for (var d = lid.x; d < p.d; d += 64u) {
        var acc = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            acc += part_o[(base + s) * p.d + d] * exp(part_ml[base + s].x - mx);
        }
        out[th * p.d + d] = acc * inv;
    }
}
