// dequant_q2_k.wgsl — decoder for GGUF Q2_K weights.
//
// Super-block (84 bytes, 256 values): 16 scale bytes (low nibble: scale,
// high nibble: min, one byte per 16 values), 64 bytes of 2-bit quants, f16 d,
// f16 dmin. Value i = 128n + 32s + l (n < 2, s < 4, l < 32) is bits 2s..2s+1
// of quant byte 32n + l; x = d * sc * q - dmin * m, as tensor::dequantize
// computes it. 84-byte super-blocks keep every field 4-aligned. The kernels'
// 32-value block b is n = (b % 8) / 4, s = b % 4 of super-block b / 8.
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 84u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + (b / 8u) * W_BLOCK_BYTES;
    let j = b % 8u;
    let dm = unpack2x16float(w[(o + 80u) >> 2u]);
    let q = ((o + 16u) >> 2u) + (j / 4u) * 8u;
    let shift = 2u * (j % 4u);
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        // Values 4i..4i+3 of the sub-block share scale byte 2j + i / 4.
        let s = w_byte(o + 2u * j + i / 4u);
        let dl = dm.x * f32(s & 15u);
        let ml = dm.y * f32(s >> 4u);
        out[i] = dl * vec4<f32>(bytes_shr(w[q + i], shift, 3u)) - ml;
    }
    return out;
}

// Decodes the whole 32-value block for one value: only the embedding gather
// uses w_value for this format (no K-quant row has a tail).
fn w_value(row: u32, k: u32) -> f32 {
    let blk = w_block(row, k / 32u);
    return blk[(k % 32u) / 4u][k % 4u];
}
