// matmul_x_storage.wgsl — matmul_nt_wq's activations x (T, C) as a storage
// buffer: any size up to the storage binding limit. The portable default.
//
// Bindings: 2 storage r x array<vec4<f32>> (T*C values, padded to whole vec4s).

@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

fn x4(i: u32) -> vec4<f32> {
    return x[i];
}
