// rms_norm_rows_f32.wgsl — RMSNorm over rows.
//
// Purpose: out = x * 1/sqrt(mean(x²) + eps) * weight for each row of L
// values, as model::rms_norm computes it. With L = C it is the layer norm on
// (T, C); with L = D on (T*H, D) it is Qwen3's per-head q/k norm; with
// L = H*D on (T, H*D) it is OLMoE's whole-vector q/k norm.
//
// Bindings (group 0):
//   0 uniform    p       Params (below)
//   1 storage r  x       array<f32>: (R, L)
//   2 storage r  weight  array<f32>: (L)
//   3 storage rw out     array<f32>: (R, L)
//
// Workgroup: (64, 1, 1); one workgroup per row, the 64 invocations stride
//   over the row and reduce their partial sums of squares in workgroup memory.
// Grid: (min(R, 65535), ceil(R / 65535), 1); row = wid.x + wid.y * groups_x.

struct Params {
    rows: u32,      // R
    len: u32,       // L
    eps: f32,
    groups_x: u32,
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    // `row` is the same for the whole workgroup, so this early return keeps
    // the barriers below in uniform control flow.
    let row = wid.x + wid.y * p.groups_x;
    if row >= p.rows {
        return;
    }
    let base = row * p.len;
    var s = 0.0;
    for (var i = lid.x; i < p.len; i += WG) {
        let v = x[base + i];
        s += v * v;
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid.x < stride {
            partial[lid.x] += partial[lid.x + stride];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(partial[0] / f32(p.len) + p.eps);
    for (var i = lid.x; i < p.len; i += WG) {
        out[base + i] = weight[i] * (x[base + i] * inv);
    }
}
