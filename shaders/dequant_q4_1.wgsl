// dequant_q4_1.wgsl — decoder for GGUF Q4_1 weights.
//
// Block (20 bytes, 32 values): f16 scale d, f16 minimum m, then 16 bytes of
// nibbles laid out as in Q4_0; x = d * q + m, as tensor::dequantize computes
// it. 20-byte blocks keep every field 4-aligned, so no re-joining is needed.
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 20u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + b * W_BLOCK_BYTES;
    let base = o >> 2u;
    let dm = unpack2x16float(w[base]);
    var out: array<vec4<f32>, 8>;
    for (var j = 0u; j < 4u; j++) {
        let v = w[base + 1u + j];
        out[j] = dm.x * nib_lo(v) + dm.y;
        out[j + 4u] = dm.x * nib_hi(v) + dm.y;
    }
    return out;
}

fn w_value(row: u32, k: u32) -> f32 {
    let o = row + (k / 32u) * W_BLOCK_BYTES;
    let dm = unpack2x16float(w[o >> 2u]);
    let j = k % 32u;
    let b = w_byte(o + 4u + j % 16u);
    let q = select(b & 15u, b >> 4u, j >= 16u);
    return dm.x * f32(q) + dm.y;
}
