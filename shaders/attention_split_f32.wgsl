// attention_split_f32.wgsl — causal attention over the paged KV cache, one
// split of the key range per workgroup (flash-decoding).
//
// Purpose: for query token t (of sequence seq[t], at position pos[t]) and
// head h, the keys it may see are positions [first, pos] of its sequence,
// with first = 0, or pos + 1 - window under a sliding window. That range is
// cut into splits of SPLIT keys; workgroup (s, h, t) handles split s and
// writes its partial softmax state: the max score m, the sum l of
// exp(score - m), and o = sum exp(score - m) * v. attention_merge_f32.wgsl
// combines the splits. Long contexts thus spread over many workgroups even
// when a decode step has few query tokens; a prefill chunk simply has many.
//   scores = q · kᵀ / sqrt(D)                # attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * self.scaling
//   p = softmax(scores over visible keys)    # nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)
//   out = p · v                              # torch.matmul(attn_weights, value_states)
// Grouped-query attention: head h reads kv head h / (H / Hkv).
//
// Defines: HEAD_DIM (D), SPLIT (keys per split, at most 256).
//
// Bindings (group 0):
//   0 uniform    p        Params (below)
//   1 storage r  q        array<f32>: (T, H, D)
//   2 storage r  k_cache  array<f32>: (rows, Hkv, D), rows = pages * PAGE
//   3 storage r  v_cache  array<f32>: (rows, Hkv, D)
//   4 storage r  tok      array<vec2<u32>>: (T) (sequence index, position)
//   5 storage r  pages    array<u32>: (B, max_pages) page table
//   6 storage rw part_o   array<f32>: (T, H, splits, D)
//   7 storage rw part_ml  array<vec2<f32>>: (T, H, splits) (m, l)
//
// Workgroup: (64, 1, 1). Grid: (splits, H, T).

struct Params {
    h: u32,
    hkv: u32,
    page: u32,       // tokens per page
    max_pages: u32,  // row stride of the page table
    splits: u32,
    window: u32,     // sliding window, 0 = none
    scale: f32,      // 1 / sqrt(D)
    _pad0: u32,
}

const WG: u32 = 64u;
// A finite stand-in for -infinity, so that exp(m_a - m_b) never computes inf - inf.
const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read> tok: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read> pages: array<u32>;
@group(0) @binding(6) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(7) var<storage, read_write> part_ml: array<vec2<f32>>;

var<workgroup> qs: array<f32, HEAD_DIM>;
var<workgroup> sc: array<f32, SPLIT>;
var<workgroup> rows: array<u32, SPLIT>;
var<workgroup> red: array<f32, WG>;

// Workgroup-wide reduction of red[]: max when is_max, else sum. All
// invocations call it (uniform control flow) and get the result.
fn reduce(lid: u32, is_max: bool) -> f32 {
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            let a = red[lid];
            let b = red[lid + stride];
            red[lid] = select(a + b, max(a, b), is_max);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let s = wid.x;
    let h = wid.y;
    let t = wid.z;
    let info = tok[t];
    let seq = info.x;
    let pos = info.y;
    var first = 0u;
    if p.window != 0u && pos + 1u > p.window {
        first = pos + 1u - p.window;
    }
    let start = first + s * SPLIT;
    let end = min(pos + 1u, start + SPLIT);
    let out = (t * p.h + h) * p.splits + s;
    // Uniform for the workgroup: splits beyond this token's range are empty.
    if start >= end {
        for (var d = lid; d < HEAD_DIM; d += WG) {
            part_o[out * HEAD_DIM + d] = 0.0;
        }
        if lid == 0u {
            part_ml[out] = vec2<f32>(NEG_BIG, 0.0);
        }
        return;
    }
    let n = end - start;
    let kvh = h / (p.h / p.hkv);
    for (var d = lid; d < HEAD_DIM; d += WG) {
        qs[d] = q[(t * p.h + h) * HEAD_DIM + d];
    }
    workgroupBarrier();

    // Scores, one key per invocation at a time.
    var m = NEG_BIG;
    for (var j = lid; j < n; j += WG) {
        let kp = start + j;
        let row = pages[seq * p.max_pages + kp / p.page] * p.page + kp % p.page;
        rows[j] = row;
        let kb = (row * p.hkv + kvh) * HEAD_DIM;
        var acc = 0.0;
        for (var d = 0u; d < HEAD_DIM; d++) {
            acc += qs[d] * k_cache[kb + d];
        }
        let v = acc * p.scale;
        sc[j] = v;
        m = max(m, v);
    }
    red[lid] = m;
    m = reduce(lid, true);

    var l = 0.0;
    for (var j = lid; j < n; j += WG) {
        let e = exp(sc[j] - m);
        sc[j] = e;
        l += e;
    }
    red[lid] = l;
    l = reduce(lid, false);

    // Weighted values: one output dimension per invocation at a time; the
    // reads of v for neighbouring dimensions are neighbouring addresses.
    for (var d = lid; d < HEAD_DIM; d += WG) {
        var acc = 0.0;
        for (var j = 0u; j < n; j++) {
            acc += sc[j] * v_cache[(rows[j] * p.hkv + kvh) * HEAD_DIM + d];
        }
        part_o[out * HEAD_DIM + d] = acc;
    }
    if lid == 0u {
        part_ml[out] = vec2<f32>(m, l);
    }
}
