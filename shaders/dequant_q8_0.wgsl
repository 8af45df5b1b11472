// dequant_q8_0.wgsl — decoder for GGUF Q8_0 weights.
//
// Block (34 bytes, 32 values): f16 scale d, then 32 signed bytes q; x = d * q,
// exactly as tensor::dequantize computes it. Blocks are only 2-aligned, so the
// quants are read as 9 aligned words and re-joined (w_join).
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 34u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + b * W_BLOCK_BYTES;
    let d = w_f16(o);
    let q = o + 2u;
    let base = q >> 2u;
    var out: array<vec4<f32>, 8>;
    var lo = w[base];
    for (var j = 0u; j < 8u; j++) {
        let hi = w[base + j + 1u];
        out[j] = d * i8x4(w_join(lo, hi, q));
        lo = hi;
    }
    return out;
}

fn w_value(row: u32, k: u32) -> f32 {
    let o = row + (k / 32u) * W_BLOCK_BYTES;
    let q = w_byte(o + 2u + k % 32u);
    return w_f16(o) * f32(bitcast<i32>(q << 24u) >> 24u);
}
