// gather_rows_f32.wgsl — pick rows of a matrix: out[r] = x[idx[r]].
//
// Purpose: select the positions whose logits are wanted (the last new token
// of each sequence during generation) before the final norm and the LM
// head, so the (V, C) head runs on B rows instead of all T.
//
// Bindings (group 0):
//   0 uniform    p    Params (below)
//   1 storage r  x    array<f32>: (T, C)
//   2 storage r  idx  array<u32>: (R) row of x for each output row
//   3 storage rw out  array<f32>: (R, C)
//
// Workgroup: (256, 1, 1); one invocation per output value, i = (wid.x + wid.y * groups_x) * 256 + lid.x.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(R * C / 256).

struct Params {
    r: u32,
    c: u32,
    groups_x: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if i >= p.r * p.c {
        return;
    }
    out[i] = x[idx[i / p.c] * p.c + i % p.c];
}
