// dequant_q5_0.wgsl — decoder for GGUF Q5_0 weights.
//
// Block (22 bytes, 32 values): f16 scale d, u32 qh (bit j = fifth bit of
// value j), then 16 bytes; byte j holds the low four bits of value j in its
// low nibble and of value j + 16 in its high nibble; x = d * (q - 16), as
// tensor::dequantize computes it. Blocks are only 2-aligned (see w_u32).
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 22u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + b * W_BLOCK_BYTES;
    let d = w_f16(o);
    let qh = w_u32(o + 2u);
    var out: array<vec4<f32>, 8>;
    for (var j = 0u; j < 4u; j++) {
        let v = w_u32(o + 6u + 4u * j);
        // Word j holds bytes 4j..4j+3: values 4j.. (low) and 16+4j.. (high).
        out[j] = d * (vec4<f32>(bytes_shr(v, 0u, 15u) | (bits4(qh, 4u * j) << vec4<u32>(4u))) - 16.0);
        out[j + 4u] = d * (vec4<f32>(bytes_shr(v, 4u, 15u) | (bits4(qh, 16u + 4u * j) << vec4<u32>(4u))) - 16.0);
    }
    return out;
}

fn w_value(row: u32, k: u32) -> f32 {
    let o = row + (k / 32u) * W_BLOCK_BYTES;
    let j = k % 32u;
    let b = w_byte(o + 6u + j % 16u);
    let lo = select(b & 15u, b >> 4u, j >= 16u);
    let hi = (w_u32(o + 2u) >> j) & 1u;
    return w_f16(o) * (f32(lo | (hi << 4u)) - 16.0);
}
