// clamp_f32.wgsl — clamp every value to [-limit, limit], in place.
//
// Purpose: OLMoE's optional `clip_qkv`:
//   query_states.clamp_(min=-self.config.clip_qkv, max=self.config.clip_qkv)
//
// Bindings (group 0):
//   0 uniform    p  Params (below)
//   1 storage rw x  array<f32>: (n)
//
// Workgroup: (256, 1, 1); one invocation per value, i = (wid.x + wid.y * groups_x) * 256 + lid.x.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(n / 256).

struct Params {
    n: u32,
    groups_x: u32,
    limit: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if i >= p.n {
        return;
    }
    x[i] = clamp(x[i], -p.limit, p.limit);
}
