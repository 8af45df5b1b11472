// dequant_q5_k.wgsl — decoder for GGUF Q5_K weights.
//
// Super-block (176 bytes, 256 values): f16 d, f16 dmin, 12 bytes of packed
// 6-bit scales and mins (k_scale_min), 32 bytes qh, 128 bytes of nibbles.
// Sub-block j (values 32j..32j+31) takes its low four bits as Q4_K does and
// its fifth bit from bit j of qh byte l (l = index in the sub-block);
// x = d * sc_j * q - dmin * m_j, as tensor::dequantize computes it.
// 176-byte super-blocks keep every field 4-aligned. The kernels' 32-value
// block b is sub-block b % 8 of super-block b / 8.
// Interface: see dequant_f32.wgsl. Needs dequant_common.wgsl before it.

const W_BLOCK_BYTES: u32 = 176u;

fn w_block(row: u32, b: u32) -> array<vec4<f32>, 8> {
    let o = row + (b / 8u) * W_BLOCK_BYTES;
    let j = b % 8u;
    let dm = unpack2x16float(w[o >> 2u]);
    let sm = k_scale_min(o + 4u, j);
    let dl = dm.x * sm.x;
    let ml = dm.y * sm.y;
    let h = (o + 16u) >> 2u;
    let q = ((o + 48u) >> 2u) + (j / 2u) * 8u;
    let shift = 4u * (j % 2u);
    var out: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let v = bytes_shr(w[q + i], shift, 15u) | (bytes_shr(w[h + i], j, 1u) << vec4<u32>(4u));
        out[i] = dl * vec4<f32>(v) - ml;
    }
    return out;
}

// Decodes the whole 32-value block for one value: only the embedding gather
// uses w_value for this format (no K-quant row has a tail).
fn w_value(row: u32, k: u32) -> f32 {
    let blk = w_block(row, k / 32u);
    return blk[(k % 32u) / 4u][k % 4u];
}
