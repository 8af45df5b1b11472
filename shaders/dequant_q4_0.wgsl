// dequant_q4_0.wgsl — decoder for GGUF Q4_0 weights.
//
// Block (18 bytes, 32 values): f16 scale d, then 16 bytes; byte j holds value
// j in its low nibble and value j + 16 in its high nibble; x = d * (q - 8),
// as tensor::dequantize computes it. Blocks are only 2-aligned (see w_join).
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 18u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + b * W_BLOCK_BYTES;
    let d = w_f16(o);
    let q = o + 2u;
    let base = q >> 2u;
    var out: array<vec4<f32>, 8>;
    var lo = w[base];
    for (var j = 0u; j < 4u; j++) {
        let hi = w[base + j + 1u];
        let v = w_join(lo, hi, q);
        // Word j holds bytes 4j..4j+3: values 4j.. (low) and 16+4j.. (high).
        out[j] = d * (nib_lo(v) - 8.0);
        out[j + 4u] = d * (nib_hi(v) - 8.0);
        lo = hi;
    }
    return out;
}

fn w_value(row: u32, k: u32) -> f32 {
    let o = row + (k / 32u) * W_BLOCK_BYTES;
    let j = k % 32u;
    let b = w_byte(o + 2u + j % 16u);
    let q = select(b & 15u, b >> 4u, j >= 16u);
    return w_f16(o) * (f32(q) - 8.0);
}
