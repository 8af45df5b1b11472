// dequant_f32.wgsl — decoder for f32 weights (F16/BF16 tensors are widened
// to f32 on upload, so they use this decoder too).
//
// Interface shared by every dequant_<format>.wgsl (see README.md):
//   fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8>
//       values 32b .. 32b + 31 of the row that starts at byte offset `row`
//   fn w_value(row: u32, k: u32) -> f32
//       value k of the row that starts at byte offset `row`
// Kernels step through a row in 32-value blocks whatever the format: a
// format with 32-value blocks finds block b at row + b * its block bytes; a
// K-quant (256-value super-blocks) finds super-block b / 8 and decodes its
// sub-block b % 8. Each decoder's own W_BLOCK_BYTES is private to it.
// F32 rows may have any length; kernels use w_block for whole blocks of 32
// and w_value for the tail. Bindings: uses the kernel's `w: array<u32>`.

const W_BLOCK_BYTES: u32 = 128u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + b * W_BLOCK_BYTES;
    let base = o >> 2u;
    var out: array<vec4<f32>, 8>;
    for (var j = 0u; j < 8u; j++) {
        let i = base + 4u * j;
        out[j] = bitcast<vec4<f32>>(vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]));
    }
    return out;
}

fn w_value(row: u32, k: u32) -> f32 {
    return bitcast<f32>(w[(row >> 2u) + k]);
}
