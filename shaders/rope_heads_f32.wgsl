// rope_heads_f32.wgsl — rotary position embedding, in place, on (T, H, D).
//
// Purpose: rotate each head vector of token t by its position pos[t], as
// model::rope does. Pairing: NeoX (i, i + D/2) or Interleaved (2i, 2i + 1),
// chosen by p.interleaved. The angle is f32(pos) * inv_freq[i] where the host
// computed inv_freq[i] = 1 / theta^(2i/D) in f32 exactly as the CPU reference
// does, so the angle is bit-identical to the CPU's; computing theta^(2i/D)
// in the shader would not be, because WGSL's pow may be off by many ULPs and
// the error grows with the position. The angle is reduced to [-pi, pi] in two
// steps (Cody-Waite) before sin/cos, whose WGSL accuracy is only specified there.
//
// Bindings (group 0):
//   0 uniform    p         Params (below)
//   1 storage rw x         array<f32>: (T, H, D), rotated in place
//   2 storage r  pos       array<u32>: (T)
//   3 storage r  inv_freq  array<f32>: (D/2)
//
// Workgroup: (256, 1, 1); one invocation per rotated pair (t, h, i), linear
//   index j = (wid.x + wid.y * groups_x) * 256 + lid.x = (t * H + h) * D/2 + i.
// Grid: (min(G, 65535), ceil(G / 65535), 1) with G = ceil(T * H * D/2 / 256).

struct Params {
    t: u32,
    h: u32,
    d: u32,
    interleaved: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;

// 2*pi split into a part with few mantissa bits (k * TWO_PI_HI is exact for
// k < 2^16) and the rest.
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 0.0019353071795864769;
const INV_TWO_PI: f32 = 0.15915494309189535;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let half = p.d / 2u;
    let j = (wid.x + wid.y * p.groups_x) * 256u + lid.x;
    if j >= p.t * p.h * half {
        return;
    }
    let i = j % half;
    let head = j / half;          // t * H + h
    let tok = head / p.h;
    let angle = f32(pos[tok]) * inv_freq[i];
    let k = round(angle * INV_TWO_PI);
    let r = (angle - k * TWO_PI_HI) - k * TWO_PI_LO;
    let sn = sin(r);
    let cs = cos(r);
    let base = head * p.d;
    var a = base + i;
    var b = base + i + half;
    if p.interleaved != 0u {
        a = base + 2u * i;
        b = a + 1u;
    }
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * cs - x1 * sn;
    x[b] = x1 * cs + x0 * sn;
}
