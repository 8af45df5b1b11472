#!/usr/bin/env python3
"""Independent NumPy re-implementation that checks models/fixtures/*/golden.safetensors.

Reads only config.json + the safetensors files (no transformers), so it doubles
as an executable spec of what a runtime has to do for each architecture:

* RMSNorm: x * rsqrt(mean(x^2) + eps) * w      (computed in f32)
* RoPE: HF "rotate_half" (NeoX) layout, inv_freq = theta^(-2i/d), positions 0..T-1
* GQA attention with causal mask, softmax in f32, scale 1/sqrt(head_dim)
* OLMoE: q_norm / k_norm are RMSNorms over the *whole* projected q / k
  (num_heads*head_dim and num_kv_heads*head_dim) before the head split
* Qwen3-MoE: q_norm / k_norm are per-head RMSNorms over head_dim
* MoE: probs = softmax(router_logits); top-k; Mixtral always renormalises the
  top-k weights, OLMoE/Qwen use `norm_topk_prob`
* Qwen2-MoE: + sigmoid(shared_expert_gate(x)) * shared_expert(x); layers in
  mlp_only_layers use a dense MLP of size intermediate_size
* experts: per-expert (w1/w3/w2 or gate/up/down_proj) or fused
  gate_up_proj [E, 2I, H] (first I rows = gate, next I = up) and
  down_proj [E, H, I]

Usage: python models/check_fixtures.py   (exit code 1 on mismatch)
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

FIX = Path(__file__).resolve().parent / "fixtures"


def load_weights(d: Path) -> dict:
    w = {}
    for f in sorted(d.glob("model*.safetensors")):
        # safetensors.numpy cannot represent bf16; go through torch if needed
        try:
            part = load_file(f)
        except Exception:
            from safetensors.torch import load_file as tload
            part = {k: v.float().numpy() for k, v in tload(f).items()}
        w.update(part)
    return {k: v.astype(np.float32) for k, v in w.items()}


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1 + np.exp(-x))


def rope(x, theta):  # x [h, T, d]
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
    ang = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv[None]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb), np.sin(emb)
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def forward(cfg, w, ids):
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps, theta = cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"]
    mt = cfg["model_type"]
    E = cfg.get("num_local_experts", cfg.get("num_experts"))
    k = cfg.get("num_experts_per_tok")
    T = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    lin = lambda a, p: a @ w[p + ".weight"].T + (w[p + ".bias"] if p + ".bias" in w else 0)
    for L in range(cfg["num_hidden_layers"]):
        P = f"model.layers.{L}."
        h = rms(x, w[P + "input_layernorm.weight"], eps)
        q, kk, v = (lin(h, P + f"self_attn.{n}_proj") for n in "qkv")
        if mt == "olmoe":
            q, kk = rms(q, w[P + "self_attn.q_norm.weight"], eps), rms(kk, w[P + "self_attn.k_norm.weight"], eps)
        q = q.reshape(T, nh, hd).transpose(1, 0, 2)
        kk = kk.reshape(T, nkv, hd).transpose(1, 0, 2)
        v = v.reshape(T, nkv, hd).transpose(1, 0, 2)
        if mt == "qwen3_moe":
            q, kk = rms(q, w[P + "self_attn.q_norm.weight"], eps), rms(kk, w[P + "self_attn.k_norm.weight"], eps)
        q, kk = rope(q, theta), rope(kk, theta)
        rep = nh // nkv
        kk, v = np.repeat(kk, rep, 0), np.repeat(v, rep, 0)
        s = q @ kk.transpose(0, 2, 1) / np.sqrt(hd)
        s = s + np.triu(np.full((T, T), -np.inf, np.float32), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        a = (p @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + lin(a, P + "self_attn.o_proj")

        h = rms(x, w[P + "post_attention_layernorm.weight"], eps)
        dense = E is None or L in (cfg.get("mlp_only_layers") or [])
        if dense:
            x = x + lin(silu(lin(h, P + "mlp.gate_proj")) * lin(h, P + "mlp.up_proj"), P + "mlp.down_proj")
            continue
        M = P + ("block_sparse_moe." if mt == "mixtral" else "mlp.")
        logits = lin(h, M + "gate")
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        top = np.argsort(-pr, -1, kind="stable")[:, :k]
        tw = np.take_along_axis(pr, top, -1)
        if mt == "mixtral" or cfg.get("norm_topk_prob"):
            tw = tw / tw.sum(-1, keepdims=True)
        out = np.zeros_like(h)
        for t in range(T):
            for j in range(k):
                e = top[t, j]
                if M + "experts.gate_up_proj" in w:  # fused layout
                    gu = w[M + "experts.gate_up_proj"][e] @ h[t]
                    I = gu.shape[0] // 2
                    y = w[M + "experts.down_proj"][e] @ (silu(gu[:I]) * gu[I:])
                elif mt == "mixtral":
                    ex = lambda n: w[f"{M}experts.{e}.{n}.weight"]
                    y = ex("w2") @ (silu(ex("w1") @ h[t]) * (ex("w3") @ h[t]))
                else:
                    ex = lambda n: w[f"{M}experts.{e}.{n}_proj.weight"]
                    y = ex("down") @ (silu(ex("gate") @ h[t]) * (ex("up") @ h[t]))
                out[t] += tw[t, j] * y
        if M + "shared_expert_gate.weight" in w:
            S = M + "shared_expert."
            sh = lin(silu(lin(h, S + "gate_proj")) * lin(h, S + "up_proj"), S + "down_proj")
            g = 1 / (1 + np.exp(-lin(h, M + "shared_expert_gate")))
            out = out + g * sh
        x = x + out
    x = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def main():
    ok = True
    for d in sorted(p for p in FIX.iterdir() if (p / "golden.safetensors").exists()):
        cfg = json.loads((d / "config.json").read_text())
        w = load_weights(d)
        g = load_file(d / "golden.safetensors")
        err = 0.0
        for i in range(2):
            ref = forward(cfg, w, g[f"input_ids.{i}"].astype(np.int64))
            err = max(err, float(np.abs(ref - g[f"logits.{i}"]).max()))
        good = err < 1e-3
        ok &= good
        print(f"{d.name:20s} max|numpy - golden| = {err:.2e} {'OK' if good else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
