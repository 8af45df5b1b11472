// matmul_x_uniform.wgsl — matmul_nt_wq's activations x (T, C) as a uniform
// buffer, used when all of x fits one uniform binding (64 KiB on most
// devices: decode-sized T) and C % 4 == 0. Every invocation of a workgroup
// reads the same x values; uniform loads at a workgroup-uniform index are
// one scalar load and a broadcast on lavapipe (storage loads are a loop over
// the SIMD lanes there) and go through the constant cache on GPUs.
//
// Define: X_VEC4S = ceil(T*C / 4). Bindings: 2 uniform x array<vec4<f32>, X_VEC4S>.

@group(0) @binding(2) var<uniform> x: array<vec4<f32>, X_VEC4S>;

fn x4(i: u32) -> vec4<f32> {
    return x[i];
}
