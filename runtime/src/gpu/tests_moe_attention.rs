//! The routing, grouping, grouped-expert, combine and attention kernels
//! against plain CPU implementations on seeded inputs, including the edge
//! cases: one token, all tokens choosing the same experts, tied logits,
//! contexts longer than one attention split, sliding windows, grouped-query
//! heads and non-contiguous KV pages.

use crate::config::Routing as RoutingCfg;
use crate::gpu::attention::{ATTENTION_SPLIT, AttentionShape, attention, kv_append};
use crate::gpu::bench::seeded;
use crate::gpu::moe::{GpuExperts, Grouping, MoeInput, Routing, group_by_expert, moe_combine, moe_matmul, route_topk};
use crate::gpu::tests::{assert_close, ctx, run};
use crate::gpu::*;
use crate::linear::{QLinear, dot};
use crate::model::{self, softmax};
use crate::tensor::{DType, QTensor, quantize};

fn routing(ctx: &GpuContext, logits: &[f32], t: usize, e: usize, k: usize) -> Routing {
    Routing {
        logits: ctx.upload_f32("test router logits", logits, &[t, e]).unwrap(),
        ids: ctx.zeros_u32("test ids", &[t, k]).unwrap(),
        weights: ctx.zeros_f32("test weights", &[t, k]).unwrap(),
    }
}

/// GPU routing vs `model::route` for each token: same experts in the same
/// order, and weights within 1e-6.
fn check_route(ctx: &GpuContext, what: &str, logits: &[f32], t: usize, e: usize, k: usize, cfg: RoutingCfg) {
    let r = routing(ctx, logits, t, e, k);
    run(ctx, "route test", |enc| {
        route_topk(ctx, enc, &r, cfg.renormalize || !cfg.softmax_then_topk)
    });
    let ids = ctx.read_u32(&r.ids).unwrap();
    let w = ctx.read_f32(&r.weights).unwrap();
    for tok in 0..t {
        let want = model::route(&logits[tok * e..(tok + 1) * e], k, cfg);
        for (slot, (we, ww)) in want.iter().enumerate() {
            let i = tok * k + slot;
            assert_eq!(ids[i] as usize, *we, "{what}: token {tok} slot {slot}: expert");
            assert!(
                (w[i] - ww).abs() <= 1e-6,
                "{what}: token {tok} slot {slot}: weight {} vs {ww}",
                w[i]
            );
        }
    }
}

#[test]
fn route_topk_matches_cpu_routing() {
    let Some(ctx) = ctx() else { return };
    let mixtral = RoutingCfg {
        softmax_then_topk: true,
        renormalize: true,
    };
    let qwen = RoutingCfg {
        softmax_then_topk: true,
        renormalize: false,
    };
    for (t, e, k) in [(1, 8, 2), (37, 16, 8), (5, 64, 6), (3, 256, 32)] {
        let logits: Vec<f32> = seeded(t * e, 40 + e as u64).iter().map(|v| v * 4.0).collect();
        check_route(ctx, &format!("T={t} E={e} K={k}"), &logits, t, e, k, mixtral);
        check_route(ctx, &format!("T={t} E={e} K={k} no renorm"), &logits, t, e, k, qwen);
    }
    // Ties: equal logits go to the lower expert index, as on the CPU.
    let tied = vec![0.5f32; 2 * 8];
    check_route(ctx, "all tied", &tied, 2, 8, 3, mixtral);
    let mut some = seeded(8, 3);
    some[2] = 9.0;
    some[6] = 9.0;
    check_route(ctx, "two tied maxima", &some, 1, 8, 2, mixtral);
}

#[test]
fn route_topk_rejects_bad_shapes() {
    let Some(ctx) = ctx() else { return };
    let r = routing(ctx, &[0.0; 8], 1, 8, 9);
    let mut enc = ctx.encoder("bad route");
    let err = route_topk(ctx, &mut enc, &r, true).unwrap_err().to_string();
    assert!(err.contains("K = 9"), "{err}");
}

/// CPU grouping: per expert, its assignments in ascending order.
fn cpu_groups(ids: &[u32], e: usize) -> Vec<Vec<u32>> {
    let mut g = vec![Vec::new(); e];
    for (a, &id) in ids.iter().enumerate() {
        g[id as usize].push(a as u32);
    }
    g
}

fn check_group(ctx: &GpuContext, what: &str, ids: &[u32], t: usize, e: usize, k: usize) {
    let w: Vec<f32> = (0..t * k).map(|i| i as f32 * 0.25).collect();
    let r = Routing {
        logits: ctx.zeros_f32("unused logits", &[t, e]).unwrap(),
        ids: ctx.upload_u32("ids", ids, &[t, k]).unwrap(),
        weights: ctx.upload_f32("weights", &w, &[t, k]).unwrap(),
    };
    let g = Grouping::new(ctx, t, e, k).unwrap();
    run(ctx, "group test", |enc| group_by_expert(ctx, enc, &r, &g));
    let offsets = ctx.read_u32(&g.offsets).unwrap();
    let list = ctx.read_u32(&g.list).unwrap();
    let order = ctx.read_u32(&g.order).unwrap();
    let order_w = ctx.read_f32(&g.order_w).unwrap();
    let active = ctx.read_u32(&g.active).unwrap()[0];
    let want = cpu_groups(ids, e);
    assert_eq!(
        active as usize,
        want.iter().filter(|v| !v.is_empty()).count(),
        "{what}: active experts"
    );
    for (ex, members) in want.iter().enumerate() {
        let (a, b) = (offsets[ex] as usize, offsets[ex + 1] as usize);
        assert_eq!(&list[a..b], &members[..], "{what}: expert {ex}'s list");
    }
    // order[t, r]: grouped positions of token t's slots sorted by expert.
    for tok in 0..t {
        let mut slots: Vec<usize> = (0..k).collect();
        slots.sort_by_key(|&s| ids[tok * k + s]);
        for (r, &s) in slots.iter().enumerate() {
            let a = (tok * k + s) as u32;
            let pos = order[tok * k + r] as usize;
            assert_eq!(list[pos], a, "{what}: token {tok} rank {r}");
            assert_eq!(
                order_w[tok * k + r],
                w[a as usize],
                "{what}: token {tok} rank {r} weight"
            );
        }
    }
}

#[test]
fn group_by_expert_matches_cpu_grouping() {
    let Some(ctx) = ctx() else { return };
    // B = 1.
    check_group(ctx, "one token", &[3, 1], 1, 8, 2);
    // All tokens agree: two experts hold everything, the rest are idle.
    let agree: Vec<u32> = (0..16).flat_map(|_| [5u32, 2]).collect();
    check_group(ctx, "all agree", &agree, 16, 8, 2);
    // All tokens disagree: every expert gets exactly one token.
    let disagree: Vec<u32> = (0..8).collect();
    check_group(ctx, "all disagree", &disagree, 4, 8, 2);
    // Seeded: distinct experts per token.
    let (t, e, k) = (300, 64, 6);
    let mut ids = Vec::new();
    for tok in 0..t {
        let mut s = seeded(e, 900 + tok as u64).into_iter().enumerate().collect::<Vec<_>>();
        s.sort_by(|a, b| b.1.total_cmp(&a.1));
        ids.extend(s[..k].iter().map(|(i, _)| *i as u32));
    }
    check_group(ctx, "seeded T=300 E=64 K=6", &ids, t, e, k);
}

/// The grouped expert matmuls + combine against a per-token CPU loop.
#[test]
fn moe_matmul_and_combine_match_cpu_experts() {
    let Some(ctx) = ctx() else { return };
    for dtype in DType::ALL
        .into_iter()
        .filter(|d| !matches!(d, DType::F16 | DType::BF16))
    {
        // K-quant rows need whole 256-value super-blocks; c = 768 also makes
        // Q3_K/Q6_K rows (330/630 bytes) 2-aligned on every other row.
        let (c, i) = if dtype.block().0 == 256 { (256, 768) } else { (64, 96) };
        let (t, e, k) = (9, 6, 2);
        let w1: Vec<QTensor> = (0..e)
            .map(|x| {
                QTensor::from_bytes(
                    format!("gate{x}"),
                    dtype,
                    vec![i, c],
                    quantize(dtype, &seeded(i * c, 10 + x as u64)),
                )
            })
            .collect();
        let w2: Vec<QTensor> = (0..e)
            .map(|x| {
                QTensor::from_bytes(
                    format!("down{x}"),
                    dtype,
                    vec![c, i],
                    quantize(dtype, &seeded(i * c, 50 + x as u64)),
                )
            })
            .collect();
        let h = seeded(t * c, 7);
        let logits: Vec<f32> = seeded(t * e, 8).iter().map(|v| v * 3.0).collect();
        let cfg = RoutingCfg {
            softmax_then_topk: true,
            renormalize: true,
        };
        // CPU: x + Σ_k w_k · down_e(gate_e(h)) with experts in index order.
        let mut x0 = seeded(t * c, 9);
        let mut want = x0.clone();
        for tok in 0..t {
            let mut chosen = model::route(&logits[tok * e..(tok + 1) * e], k, cfg);
            chosen.sort_by_key(|(ex, _)| *ex);
            let mut s = vec![0f32; c];
            for (ex, wt) in chosen {
                let g = QLinear::new(w1[ex].clone(), None).forward(&h[tok * c..(tok + 1) * c], 1);
                let y = QLinear::new(w2[ex].clone(), None).forward(&g, 1);
                s.iter_mut().zip(&y).for_each(|(s, y)| *s += wt * y);
            }
            want[tok * c..(tok + 1) * c]
                .iter_mut()
                .zip(&s)
                .for_each(|(o, s)| *o += s);
        }

        let g1 = GpuExperts::upload(ctx, "gate", &w1.iter().collect::<Vec<_>>()).unwrap();
        let g2 = GpuExperts::upload(ctx, "down", &w2.iter().collect::<Vec<_>>()).unwrap();
        let r = routing(ctx, &logits, t, e, k);
        let grouping = Grouping::new(ctx, t, e, k).unwrap();
        let gh = ctx.upload_f32("h", &h, &[t, c]).unwrap();
        let gx = ctx.upload_f32("x", &x0, &[t, c]).unwrap();
        let gy = ctx.zeros_f32("gy", &[t * k, i]).unwrap();
        let dy = ctx.zeros_f32("dy", &[t * k, c]).unwrap();
        run(ctx, "moe test", |enc| {
            route_topk(ctx, enc, &r, true)?;
            group_by_expert(ctx, enc, &r, &grouping)?;
            moe_matmul(ctx, enc, &g1, &gh, MoeInput::Tokens, &grouping, t, k, &gy)?;
            moe_matmul(ctx, enc, &g2, &gy, MoeInput::Grouped, &grouping, t, k, &dy)?;
            moe_combine(ctx, enc, &gx, &dy, &grouping, None)
        });
        let got = ctx.read_f32(&gx).unwrap();
        assert_close(&format!("moe {dtype}"), &got, &want, c, 1e-4);
        x0.clear();
    }
}

/// Policies that pad a token's unused slots repeat one of its experts, so an
/// expert can hold more than T grouped positions (here all T * K but one):
/// the grouped matmuls must still cover every one of them.
#[test]
fn moe_matmul_covers_experts_with_more_than_t_positions() {
    let Some(ctx) = ctx() else { return };
    let (t, e, k, c, i) = (9, 4, 3, 64, 32);
    let expert = |x: usize, rows: usize, cols: usize, seed: u64| {
        QTensor::from_bytes(
            format!("w{x}"),
            DType::F32,
            vec![rows, cols],
            quantize(DType::F32, &seeded(rows * cols, seed)),
        )
    };
    let w1: Vec<QTensor> = (0..e).map(|x| expert(x, i, c, 20 + x as u64)).collect();
    let w2: Vec<QTensor> = (0..e).map(|x| expert(x, c, i, 60 + x as u64)).collect();
    let mut ids = vec![0u32; t * k];
    ids[1] = 2;
    let weights = seeded(t * k, 5);
    let h = seeded(t * c, 7);
    let x0 = seeded(t * c, 9);
    let mut want = x0.clone();
    for tok in 0..t {
        for slot in 0..k {
            let (ex, wt) = (ids[tok * k + slot] as usize, weights[tok * k + slot]);
            let g = QLinear::new(w1[ex].clone(), None).forward(&h[tok * c..(tok + 1) * c], 1);
            let y = QLinear::new(w2[ex].clone(), None).forward(&g, 1);
            want[tok * c..(tok + 1) * c]
                .iter_mut()
                .zip(&y)
                .for_each(|(o, y)| *o += wt * y);
        }
    }
    let g1 = GpuExperts::upload(ctx, "gate", &w1.iter().collect::<Vec<_>>()).unwrap();
    let g2 = GpuExperts::upload(ctx, "down", &w2.iter().collect::<Vec<_>>()).unwrap();
    let r = Routing {
        logits: ctx.zeros_f32("test router logits", &[t, e]).unwrap(),
        ids: ctx.upload_u32("ids", &ids, &[t, k]).unwrap(),
        weights: ctx.upload_f32("weights", &weights, &[t, k]).unwrap(),
    };
    let grouping = Grouping::new(ctx, t, e, k).unwrap();
    let gh = ctx.upload_f32("h", &h, &[t, c]).unwrap();
    let gx = ctx.upload_f32("x", &x0, &[t, c]).unwrap();
    let gy = ctx.zeros_f32("gy", &[t * k, i]).unwrap();
    let dy = ctx.zeros_f32("dy", &[t * k, c]).unwrap();
    run(ctx, "moe padded test", |enc| {
        group_by_expert(ctx, enc, &r, &grouping)?;
        moe_matmul(ctx, enc, &g1, &gh, MoeInput::Tokens, &grouping, t, k, &gy)?;
        moe_matmul(ctx, enc, &g2, &gy, MoeInput::Grouped, &grouping, t, k, &dy)?;
        moe_combine(ctx, enc, &gx, &dy, &grouping, None)
    });
    assert_close(
        "moe, one expert with T * K - 1 positions",
        &ctx.read_f32(&gx).unwrap(),
        &want,
        c,
        1e-4,
    );
}

/// Plain causal attention over one sequence's cached keys and values
/// (len, Hkv, D) for a query at position `pos`, as model.rs computes it.
#[allow(clippy::too_many_arguments)]
fn cpu_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: usize,
    h: usize,
    hkv: usize,
    d: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; h * d];
    for hh in 0..h {
        let kvh = hh / (h / hkv);
        let qh = &q[hh * d..(hh + 1) * d];
        let mut s: Vec<f32> = (first..=pos)
            .map(|j| dot(qh, &kc[(j * hkv + kvh) * d..(j * hkv + kvh + 1) * d]) * scale)
            .collect();
        softmax(&mut s);
        for (p, j) in s.iter().zip(first..=pos) {
            let vj = &vc[(j * hkv + kvh) * d..(j * hkv + kvh + 1) * d];
            out[hh * d..(hh + 1) * d]
                .iter_mut()
                .zip(vj)
                .for_each(|(o, v)| *o += p * v);
        }
    }
    out
}

#[test]
fn attention_matches_cpu_over_paged_cache() {
    let Some(ctx) = ctx() else { return };
    let (h, hkv, d, page) = (6, 2, 32, 16);
    // Two sequences: one longer than two splits, one short; queries at the
    // last positions of each (decode) and a few earlier ones (prefill).
    let lens = [ATTENTION_SPLIT * 2 + 37, 21];
    for window in [None, Some(100)] {
        let width = hkv * d;
        // Pages handed out interleaved and backwards, so no sequence's
        // pages are contiguous.
        let pages_per: Vec<usize> = lens.iter().map(|l| l.div_ceil(page)).collect();
        let total: usize = pages_per.iter().sum();
        let mut free: Vec<u32> = (0..total as u32).collect();
        let mut table: Vec<Vec<u32>> = vec![Vec::new(); 2];
        while table.iter().zip(&pages_per).any(|(t, n)| t.len() < *n) {
            for (s, t) in table.iter_mut().enumerate() {
                if t.len() < pages_per[s] {
                    t.push(free.pop().unwrap());
                }
            }
        }
        let max_pages = *pages_per.iter().max().unwrap();
        let k_cache = ctx.zeros_f32("k cache", &[total * page, width]).unwrap();
        let v_cache = ctx.zeros_f32("v cache", &[total * page, width]).unwrap();
        let mut seq_k = Vec::new();
        let mut seq_v = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let k = seeded(len * width, 300 + s as u64);
            let v = seeded(len * width, 400 + s as u64);
            let dest: Vec<u32> = (0..len)
                .map(|p| table[s][p / page] * page as u32 + (p % page) as u32)
                .collect();
            let gk = ctx.upload_f32("k", &k, &[len, width]).unwrap();
            let gv = ctx.upload_f32("v", &v, &[len, width]).unwrap();
            let gd = ctx.upload_u32("dest", &dest, &[len]).unwrap();
            run(ctx, "append", |enc| {
                kv_append(ctx, enc, &gk, &gv, &gd, &k_cache, &v_cache)
            });
            seq_k.push(k);
            seq_v.push(v);
        }
        let queries: Vec<(usize, usize)> = vec![(0, lens[0] - 1), (1, lens[1] - 1), (0, 3), (0, 300), (1, 0)];
        let t = queries.len();
        let q = seeded(t * h * d, 77);
        let tok: Vec<u32> = queries.iter().flat_map(|&(s, p)| [s as u32, p as u32]).collect();
        let mut flat = vec![0u32; 2 * max_pages];
        for (s, tp) in table.iter().enumerate() {
            flat[s * max_pages..s * max_pages + tp.len()].copy_from_slice(tp);
        }
        let max_keys = queries
            .iter()
            .map(|&(_, p)| window.map_or(p + 1, |w| (p + 1).min(w)))
            .max()
            .unwrap();
        let shape = AttentionShape {
            heads: h,
            kv_heads: hkv,
            head_dim: d,
            page,
            max_pages,
            max_keys,
            sliding_window: window,
        };
        let gq = ctx.upload_f32("q", &q, &[t, h * d]).unwrap();
        let gt = ctx.upload_u32("tok", &tok, &[t, 2]).unwrap();
        let gp = ctx.upload_u32("pages", &flat, &[2, max_pages]).unwrap();
        let out = ctx.zeros_f32("out", &[t, h * d]).unwrap();
        run(ctx, "attention", |enc| {
            attention(ctx, enc, &shape, &gq, &k_cache, &v_cache, &gt, &gp, &out)
        });
        let got = ctx.read_f32(&out).unwrap();
        let mut want = Vec::new();
        for (i, &(s, p)) in queries.iter().enumerate() {
            want.extend(cpu_attention(
                &q[i * h * d..(i + 1) * h * d],
                &seq_k[s],
                &seq_v[s],
                p,
                h,
                hkv,
                d,
                window,
            ));
        }
        assert_close(&format!("attention window={window:?}"), &got, &want, h * d, 1e-5);
    }
}

// ---------------------------------------------------------------------------
// Expert selection kernels against selection::select_cpu.

use crate::gpu::selection::{PolicyBuffers, apply_policy, log_record_len};
use crate::selection::{LynxParams, Resolved, select_cpu};

/// Runs route_topk + apply_policy on the GPU and compares everything the
/// policy produces with the CPU oracle run on the GPU's exact routing.
fn check_policy(ctx: &GpuContext, what: &str, logits: &[f32], t: usize, e: usize, k: usize, policy: Resolved) {
    let renorm = true;
    let r = routing(ctx, logits, t, e, k);
    let b = PolicyBuffers::new(ctx, e).unwrap();
    let rec = log_record_len(t, k);
    // Two records, using the second, to check the log offset.
    let log = ctx.zeros_u32("policy log", &[2 * rec]).unwrap();
    run(ctx, "route", |enc| route_topk(ctx, enc, &r, renorm));
    let exact_ids = ctx.read_u32(&r.ids).unwrap();
    run(ctx, "policy", |enc| {
        apply_policy(ctx, enc, policy, &r, renorm, &b, &log, rec)
    });
    let want = select_cpu(policy, logits, &exact_ids, e, k, renorm);
    let ids = ctx.read_u32(&r.ids).unwrap();
    let w = ctx.read_f32(&r.weights).unwrap();
    let log = ctx.read_u32(&log).unwrap();
    assert!(
        log[..rec].iter().all(|&v| v == 0),
        "{what}: the first log record must be untouched"
    );
    let mut distinct = exact_ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        log[rec] as usize,
        distinct.len(),
        "{what}: distinct experts before selection"
    );
    let bins: Vec<i32> = log[rec + 1..rec + 1 + t * k].iter().map(|&v| v as i32).collect();
    let remapped: Vec<bool> = log[rec + 1 + t * k..rec + 1 + 2 * t * k]
        .iter()
        .map(|&v| v != 0)
        .collect();
    if matches!(policy, Resolved::Lynx(_)) {
        assert_eq!(bins, want.bins, "{what}: bins");
    }
    let active: Vec<bool> = ctx.read_u32(&b.active).unwrap().iter().map(|&v| v != 0).collect();
    assert_eq!(active, want.active, "{what}: active set");
    for i in 0..t * k {
        assert_eq!(ids[i], want.ids[i], "{what}: token {} slot {}: expert", i / k, i % k);
        assert!(
            (w[i] - want.weights[i]).abs() <= 1e-6,
            "{what}: token {} slot {}: weight {} vs {}",
            i / k,
            i % k,
            w[i],
            want.weights[i]
        );
    }
    assert_eq!(remapped, want.remapped, "{what}: remapped flags");
    // Lynx never drops a token's top-1 expert.
    if matches!(policy, Resolved::Lynx(_) | Resolved::Keep { .. }) {
        for tok in 0..t {
            assert_eq!(
                ids[tok * k],
                exact_ids[tok * k],
                "{what}: token {tok} lost its top-1 expert"
            );
        }
    }
}

#[test]
fn selection_kernels_match_the_cpu_oracle() {
    let Some(ctx) = ctx() else { return };
    let policies = |e: usize, k: usize| {
        vec![
            ("lynx", Resolved::Lynx(LynxParams::for_sparsity(e, k))),
            (
                "lynx threshold -1",
                Resolved::Lynx(LynxParams {
                    threshold_bin: -1,
                    ..LynxParams::for_sparsity(e, k)
                }),
            ),
            ("oea k0=1", Resolved::Keep { keep: 1, union: true }),
            (
                "oea k0=k/2",
                Resolved::Keep {
                    keep: (k / 2).max(1),
                    union: true,
                },
            ),
            ("topk=1", Resolved::Keep { keep: 1, union: false }),
        ]
    };
    for (t, e, k, scale) in [
        (1, 8, 2, 2.0),
        (16, 16, 8, 0.5),
        (16, 16, 8, 3.0),
        (32, 64, 8, 2.0),
        (64, 8, 2, 1.0),
        (5, 128, 4, 4.0),
    ] {
        let logits: Vec<f32> = seeded(t * e, (t * 1000 + e) as u64).iter().map(|v| v * scale).collect();
        for (name, p) in policies(e, k) {
            check_policy(
                ctx,
                &format!("{name} T={t} E={e} K={k} scale={scale}"),
                &logits,
                t,
                e,
                k,
                p,
            );
        }
    }
    let (e, k) = (8, 2);
    // All tokens agree.
    let one: Vec<f32> = seeded(e, 5).iter().map(|v| v * 2.0).collect();
    let agree: Vec<f32> = (0..12).flat_map(|_| one.iter().copied()).collect();
    // All tokens disagree: token i strongly prefers expert i, then i+1.
    let disagree: Vec<f32> = (0..8)
        .flat_map(|i| {
            (0..e).map(move |x| {
                if x == i {
                    5.0
                } else if x == (i + 1) % e {
                    4.0
                } else {
                    0.0
                }
            })
        })
        .collect();
    // Ties everywhere: all logits equal.
    let ties = vec![0.25f32; 6 * e];
    for (case, logits) in [("agree", &agree), ("disagree", &disagree), ("ties", &ties)] {
        let t = logits.len() / e;
        for (name, p) in policies(e, k) {
            check_policy(ctx, &format!("{case}: {name}"), logits, t, e, k, p);
        }
    }
}
