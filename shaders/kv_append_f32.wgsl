// kv_append_f32.wgsl — write the new tokens' keys and values into the paged KV cache.
//
// Purpose: the KV cache of one layer is a pool of pages of PAGE tokens,
// shared by all sequences; a sequence owns a list of pages (its page
// table). The host computes, for each new token t, its cache row
// dest[t] = page * PAGE + (position % PAGE); this kernel copies the token's
// k and v (already rotated and normalised) there.
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  k        array<f32>: (T, Hkv * D)
//   2 storage r  v        array<f32>: (T, Hkv * D)
//   3 storage r  dest     array<u32>: (T) cache row per token
//   4 storage rw k_cache  array<f32>: (rows, Hkv * D)
//   5 storage rw v_cache  array<f32>: (rows, Hkv * D)
//
// Workgroup: (256, 1, 1); one invocation per value, i = (wid.x + wid.y * groups_x) * 256 + lid.x.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(T * Hkv * D / 256).

struct Params {
    t: u32,
    width: u32,  // Hkv * D
    groups_x: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> dest: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if i >= p.t * p.width {
        return;
    }
    let t = i / p.width;
    let o = dest[t] * p.width + i % p.width;
    k_cache[o] = k[i];
    v_cache[o] = v[i];
}
