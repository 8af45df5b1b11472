// dequant_q5_1.wgsl — decoder for GGUF Q5_1 weights.
//
// Block (24 bytes, 32 values): f16 scale d, f16 minimum m, u32 qh (bit j =
// fifth bit of value j), then 16 bytes of nibbles laid out as in Q5_0;
// x = d * q + m, as tensor::dequantize computes it. 24-byte blocks keep
// every field 4-aligned, so no re-joining is needed.
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 24u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + b * W_BLOCK_BYTES;
    let base = o >> 2u;
    let dm = unpack2x16float(w[base]);
    let qh = w[base + 1u];
    var out: array<vec4<f32>, 8>;
    for (var j = 0u; j < 4u; j++) {
        let v = w[base + 2u + j];
        out[j] = dm.x * vec4<f32>(bytes_shr(v, 0u, 15u) | (bits4(qh, 4u * j) << vec4<u32>(4u))) + dm.y;
        out[j + 4u] = dm.x * vec4<f32>(bytes_shr(v, 4u, 15u) | (bits4(qh, 16u + 4u * j) << vec4<u32>(4u))) + dm.y;
    }
    return out;
}

fn w_value(row: u32, k: u32) -> f32 {
    let o = row + (k / 32u) * W_BLOCK_BYTES;
    let dm = unpack2x16float(w[o >> 2u]);
    let j = k % 32u;
    let b = w_byte(o + 8u + j % 16u);
    let lo = select(b & 15u, b >> 4u, j >= 16u);
    let hi = (w[(o >> 2u) + 1u] >> j) & 1u;
    return dm.x * f32(lo | (hi << 4u)) + dm.y;
}
