// dequant_q3_k.wgsl — decoder for GGUF Q3_K weights.
//
// Super-block (110 bytes, 256 values): 32 bytes hmask, 64 bytes of 2-bit
// quants, 12 bytes of packed 6-bit scales, f16 d. Value i = 128n + 32s + l
// (n < 2, s < 4, l < 32) takes bits 2s..2s+1 of quant byte 32n + l, minus 4
// where bit i / 32 of hmask byte l is clear; scale i / 16 has its low nibble
// in byte i % 8 (high half for i >= 8) and its top two bits in byte
// 8 + i % 4 at bit 2 * (i / 4), offset by 32; x = d * sc * q, as
// tensor::dequantize computes it. Super-blocks are only 2-aligned, so words
// are re-joined (w_u32). The kernels' 32-value block b is sub-block b % 8 of
// super-block b / 8.
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 110u;

// Signed scale g (0..16) of the super-block at byte offset o.
fn q3k_scale(o: u32, g: u32) -> f32 {
    let lo = (w_byte(o + 96u + g % 8u) >> (4u * (g / 8u))) & 15u;
    let hi = (w_byte(o + 104u + g % 4u) >> (2u * (g / 4u))) & 3u;
    return f32(i32(lo | (hi << 4u)) - 32);
}

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + (b / 8u) * W_BLOCK_BYTES;
    let j = b % 8u;
    let d = w_f16(o + 108u);
    let d0 = d * q3k_scale(o, 2u * j);
    let d1 = d * q3k_scale(o, 2u * j + 1u);
    let q = o + 32u + (j / 4u) * 32u;
    let shift = 2u * (j % 4u);
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let lo = vec4<i32>(bytes_shr(w_u32(q + 4u * i), shift, 3u));
        let h = vec4<i32>(bytes_shr(w_u32(o + 4u * i), j, 1u));
        let dl = select(d1, d0, i < 4u);
        out[i] = dl * vec4<f32>(lo - 4 * (vec4<i32>(1) - h));
    }
    return out;
}

// Decodes the whole 32-value block for one value: only the embedding gather
// uses w_value for this format (no K-quant row has a tail).
fn w_value(row: u32, k: u32) -> f32 {
    let blk = w_block(row, k / 32u);
    return blk[(k % 32u) / 4u][k % 4u];
}
