// dequant_common.wgsl — byte-level readers over a weight chunk.
//
// Purpose: helpers shared by the dequant_<format>.wgsl decoders. Weights are
// uploaded in their stored GGUF layout as raw bytes packed into u32 words
// (little-endian), so fields sit at byte offsets that are only 2-aligned
// (Q8_0 blocks are 34 bytes, Q4_0 blocks 18). The including kernel declares
// the weight binding as `w: array<u32>`; the host pads every chunk with at
// least one spare word so reading the word after a field is always in range.
// Bindings: none of its own (uses the kernel's `w`). Workgroup size, grid: n/a.

// Byte at byte offset o, as 0..255.
fn w_byte(o: u32) -> u32 {
    return (w[o >> 2u] >> ((o & 3u) * 8u)) & 0xFFu;
}

// The f16 at byte offset o (o even), widened to f32.
fn w_f16(o: u32) -> f32 {
    let v = unpack2x16float(w[o >> 2u]);
    return select(v.x, v.y, (o & 2u) != 0u);
}

// The u32 that starts at byte offset o (o even), given the aligned words
// `lo` (containing byte o) and `hi` (the word after it). When o is 4-aligned
// the answer is `lo`; otherwise it is the top half of `lo` and the bottom half
// of `hi`. Branch-free, because neighbouring invocations may disagree.
fn w_join(lo: u32, hi: u32, o: u32) -> u32 {
    let sh = (o & 2u) * 8u;
    return select((lo >> sh) | (hi << (32u - sh)), lo, sh == 0u);
}

// Four signed bytes of v (byte 0 first) as f32.
fn i8x4(v: u32) -> vec4<f32> {
    let s = bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v)) >> vec4<u32>(24u);
    return vec4<f32>(s);
}

// The low nibbles of v's four bytes (byte 0 first) as f32 in 0..15.
fn nib_lo(v: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(v, v >> 8u, v >> 16u, v >> 24u) & vec4<u32>(15u));
}

// The high nibbles of v's four bytes (byte 0 first) as f32 in 0..15.
fn nib_hi(v: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(v, v >> 8u, v >> 16u, v >> 24u) >> vec4<u32>(4u)) & vec4<u32>(15u));
}

// The u32 that starts at byte offset o (o even), for fields of blocks that
// are only 2-aligned (Q5_0, Q3_K, Q6_K). Two loads; see w_join.
fn w_u32(o: u32) -> u32 {
    let i = o >> 2u;
    return w_join(w[i], w[i + 1u], o);
}

// v's four bytes (byte 0 first), each shifted right by s, masked with m.
fn bytes_shr(v: u32, s: u32, m: u32) -> vec4<u32> {
    return (vec4<u32>(v, v >> 8u, v >> 16u, v >> 24u) >> vec4<u32>(s)) & vec4<u32>(m);
}

// Bits s, s+1, s+2, s+3 of x as 0 or 1 (a Q5_0/Q5_1 qh word).
fn bits4(x: u32, s: u32) -> vec4<u32> {
    return (vec4<u32>(x) >> vec4<u32>(s, s + 1u, s + 2u, s + 3u)) & vec4<u32>(1u);
}

// The 6-bit scale and min of sub-block j (0..8) of a Q4_K/Q5_K super-block
// whose 12 packed scale bytes start at byte offset s, as ggml's
// get_scale_min_k4 (and tensor::k_scale_min) unpacks them. Both cases are
// computed from in-range bytes and one is selected, without branching.
fn k_scale_min(s: u32, j: u32) -> vec2<f32> {
    let a = w_byte(s + j);
    let b = w_byte(s + j + 4u);
    let c = w_byte(s + (j & 3u));
    let e = w_byte(s + 8u + (j & 3u));
    let sc = select((e & 15u) | ((c >> 6u) << 4u), a & 63u, j < 4u);
    let m = select((e >> 4u) | ((a >> 6u) << 4u), b & 63u, j < 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// The signed byte at byte offset o, as f32.
fn w_i8(o: u32) -> f32 {
    return f32(bitcast<i32>(w_byte(o) << 24u) >> 24u);
}
