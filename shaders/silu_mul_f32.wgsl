// silu_mul_f32.wgsl — SwiGLU activation: h = silu(g) * u, elementwise.
//
// Purpose: the middle of the MLP, silu(x) = x / (1 + exp(-x)) as in model.rs.
//
// Bindings (group 0):
//   0 uniform    p  Params (below)
//   1 storage r  g  array<f32>: (T, I)
//   2 storage r  u  array<f32>: (T, I)
//   3 storage rw h  array<f32>: (T, I)
//
// Workgroup: (256, 1, 1); one invocation per element,
//   i = (wid.x + wid.y * groups_x) * 256 + lid.x.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(n / 256).

struct Params {
    n: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> h: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if i >= p.n {
        return;
    }
    let v = g[i];
    h[i] = v / (1.0 + exp(-v)) * u[i];
}
