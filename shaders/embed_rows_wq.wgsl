// embed_rows_wq.wgsl — gather token rows of an embedding matrix into f32.
//
// Purpose: x (T, C) = E[ids] for an embedding matrix E (V, C) in its stored
// format; "wq" as in matmul_nt_wq.wgsl (the host prepends dequant_common.wgsl
// and one dequant_<format>.wgsl). A large E is split into row chunks; one
// dispatch per chunk writes the tokens whose id falls in that chunk. Ids
// outside [0, V) are never written (the host validates ids beforehand).
//
// Bindings (group 0):
//   0 uniform    p    Params (below)
//   1 storage r  w    array<u32>: rows [row0, row0 + rows) of E, raw bytes
//   2 storage r  ids  array<u32>: (T)
//   3 storage rw out  array<f32>: (T, C)
//
// Workgroup: (256, 1, 1); one invocation per output value (t, k), linear
//   index i = (wid.x + wid.y * groups_x) * 256 + lid.x = t * C + k.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(T * C / 256).

struct Params {
    t: u32,          // tokens T
    c: u32,          // row length C
    row0: u32,       // first row of this chunk
    rows: u32,       // rows in this chunk
    row_bytes: u32,  // bytes per row
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if i >= p.t * p.c {
        return;
    }
    let t = i / p.c;
    let k = i % p.c;
    let id = ids[t];
    if id < p.row0 || id >= p.row0 + p.rows {
        return;
    }
    out[i] = w_value((id - p.row0) * p.row_bytes, k);
}
