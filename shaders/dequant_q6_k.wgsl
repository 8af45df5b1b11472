// dequant_q6_k.wgsl — decoder for GGUF Q6_K weights.
//
// Super-block (210 bytes, 256 values): 128 bytes ql (low four bits), 64 bytes
// qh (top two bits), 16 signed scale bytes (one per 16 values), f16 d. Value
// i = 128n + 32s + l (n < 2, s < 4, l < 32) takes nibble s / 2 of ql byte
// 64n + 32 (s % 2) + l and bits 2s..2s+1 of qh byte 128 + 32n + l;
// x = d * sc * (q - 32), as tensor::dequantize computes it. Super-blocks are
// only 2-aligned, so words are re-joined (w_u32). The kernels' 32-value
// block b is sub-block b % 8 of super-block b / 8.
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 210u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + (b / 8u) * W_BLOCK_BYTES;
    let j = b % 8u;
    let n = j / 4u;
    let s = j % 4u;
    let d = w_f16(o + 208u);
    let d0 = d * w_i8(o + 192u + 2u * j);
    let d1 = d * w_i8(o + 193u + 2u * j);
    let ql = o + 64u * n + 32u * (s % 2u);
    let qh = o + 128u + 32u * n;
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let lo = bytes_shr(w_u32(ql + 4u * i), 4u * (s / 2u), 15u);
        let hi = bytes_shr(w_u32(qh + 4u * i), 2u * s, 3u);
        let dl = select(d1, d0, i < 4u);
        out[i] = dl * (vec4<f32>(lo | (hi << vec4<u32>(4u))) - 32.0);
    }
    return out;
}

// Decodes the whole 32-value block for one value: only the embedding gather
// uses w_value for this format (no K-quant row has a tail).
fn w_value(row: u32, k: u32) -> f32 {
    let blk = w_block(row, k / 32u);
    return blk[(k % 32u) / 4u][k % 4u];
}
