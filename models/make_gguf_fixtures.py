"""Tiny random GGUF checkpoints in llama.cpp's layouts, with K-quant tensors,
and transformers' logits for them.

One file per llama.cpp architecture Lynx reads: `qwen2`, `qwen3`, `qwen2moe`,
`qwen3moe`, `olmoe` and `llama` with experts (Mixtral). Every quantised
matrix is *random block bytes* of its format (with finite, varied scale
fields, centred so that weights have mean ~0 and std ~0.08), not the
quantisation of some float weights: that exercises every bit of every field
of the decoders, and it needs no K-quant encoder. The formats are spread
over the roles (embedding, tied or untied head, attention, dense FFN,
routed experts, shared expert) so that each of Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 appears in several. Norms, biases
and routers are F32, as llama.cpp keeps them.

The reference: gguf-py 0.19 reads the written file back and dequantises
every tensor (`gguf.quants.dequantize`, the oracle of the formats), the
weights are loaded into the transformers class of the architecture (llama:
Q/K rows un-permuted, as llama.cpp's converter permuted them), and its
logits for two fixed token sequences (7 and 12 tokens, each run alone) are
written next to the file. Where transformers can itself load the GGUF
(`from_pretrained(gguf_file=...)`), its logits are compared with ours and
the largest difference is recorded, which checks the tensor-name and
metadata mapping of this script independently.

Output: models/fixtures/gguf/<name>.gguf and <name>.golden.safetensors
(input_ids.{i} I32 [T], logits.{i} F32 [T, 320]; metadata: formats per
tensor, seed, min routing gap, transformers cross-check).

Usage: HF_HUB_OFFLINE=1 /work/pyenv/bin/python models/make_gguf_fixtures.py [names...]
Versions: models/requirements-fixtures.txt. Deterministic for fixed versions.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import run_reference, write_safetensors  # noqa: E402
from make_gguf_golden import unpermute  # noqa: E402

torch.set_num_threads(2)
OUT_DIR = Path(__file__).resolve().parent / "fixtures" / "gguf"
SEQ_LENS = (7, 12)
MIN_GAP = 1e-3
WEIGHT_STD = 0.08

COMMON = dict(
    vocab_size=320,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MOE = dict(num_experts_per_tok=2)

# name -> (gguf arch, config class, model class, config kwargs, formats, seed).
# `formats` maps a llama.cpp tensor role to its format; a role that is absent
# from the model is ignored, and `output: None` ties the head to the embedding.
SPECS = {
    "qwen2": (
        "qwen2", Qwen2Config, Qwen2ForCausalLM,
        dict(intermediate_size=512, tie_word_embeddings=False),
        dict(token_embd=Q.Q5_0, attn_q=Q.Q5_K, attn_k=Q.Q5_0, attn_v=Q.Q8_0, attn_output=Q.Q4_K,
             ffn_gate=Q.Q4_K, ffn_up=Q.Q3_K, ffn_down=Q.Q6_K, output=Q.Q6_K),
        2000,
    ),
    "qwen3": (
        "qwen3", Qwen3Config, Qwen3ForCausalLM,
        dict(intermediate_size=512, tie_word_embeddings=True),
        dict(token_embd=Q.Q4_K, attn_q=Q.Q2_K, attn_k=Q.Q3_K, attn_v=Q.Q5_1, attn_output=Q.Q6_K,
             ffn_gate=Q.Q5_K, ffn_up=Q.Q4_0, ffn_down=Q.Q4_K, output=None),
        2100,
    ),
    "qwen2moe": (
        "qwen2moe", Qwen2MoeConfig, Qwen2MoeForCausalLM,
        dict(intermediate_size=512, num_experts=4, moe_intermediate_size=256,
             shared_expert_intermediate_size=256, norm_topk_prob=False, tie_word_embeddings=False, **MOE),
        dict(token_embd=Q.Q8_0, attn_q=Q.Q4_K, attn_k=Q.Q5_K, attn_v=Q.Q6_K, attn_output=Q.Q5_0,
             ffn_gate_exps=Q.Q4_K, ffn_up_exps=Q.Q5_K, ffn_down_exps=Q.Q6_K,
             ffn_gate_shexp=Q.Q2_K, ffn_up_shexp=Q.Q3_K, ffn_down_shexp=Q.Q5_1, output=Q.Q8_0),
        2200,
    ),
    "qwen3moe": (
        "qwen3moe", Qwen3MoeConfig, Qwen3MoeForCausalLM,
        dict(intermediate_size=512, num_experts=4, moe_intermediate_size=256, norm_topk_prob=True,
             tie_word_embeddings=False, **MOE),
        dict(token_embd=Q.Q6_K, attn_q=Q.Q4_K, attn_k=Q.Q4_1, attn_v=Q.Q5_K, attn_output=Q.Q3_K,
             ffn_gate_exps=Q.Q2_K, ffn_up_exps=Q.Q3_K, ffn_down_exps=Q.Q4_K, output=Q.Q5_K),
        2300,
    ),
    "olmoe": (
        "olmoe", OlmoeConfig, OlmoeForCausalLM,
        dict(intermediate_size=256, num_experts=4, norm_topk_prob=False, tie_word_embeddings=False, **MOE),
        dict(token_embd=Q.Q5_1, attn_q=Q.Q4_K, attn_k=Q.Q6_K, attn_v=Q.Q4_0, attn_output=Q.Q5_K,
             ffn_gate_exps=Q.Q5_K, ffn_up_exps=Q.Q6_K, ffn_down_exps=Q.Q5_0, output=Q.Q4_K),
        2400,
    ),
    "llama_moe": (
        "llama", MixtralConfig, MixtralForCausalLM,
        dict(intermediate_size=256, num_local_experts=4, tie_word_embeddings=False, **MOE),
        dict(token_embd=Q.Q4_1, attn_q=Q.Q5_K, attn_k=Q.Q4_K, attn_v=Q.Q2_K, attn_output=Q.Q8_0,
             ffn_gate_exps=Q.Q4_K, ffn_up_exps=Q.Q4_K, ffn_down_exps=Q.Q6_K, output=Q.Q6_K),
        2500,
    ),
}

# Byte offsets of the f16 scale fields of one block: (d, min-or-None), and
# the min/d ratio that centres the values. ggml's formulas (ggml-quants.c):
#   Q4_1/Q5_1: x = d*q + m               -> m = -d*(qmax/2)
#   Q2_K/Q4_K/Q5_K: x = d*sc*q - dmin*mn  -> dmin = d*E[q] when E[sc] = E[mn]
# Symmetric formats (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) need no min.
SCALE_FIELDS = {
    Q.Q8_0: (0, None, 0.0),
    Q.Q4_0: (0, None, 0.0),
    Q.Q5_0: (0, None, 0.0),
    Q.Q4_1: (0, 2, -7.5),
    Q.Q5_1: (0, 2, -15.5),
    Q.Q2_K: (80, 82, 1.5),
    Q.Q3_K: (108, None, 0.0),
    Q.Q4_K: (0, 2, 7.5),
    Q.Q5_K: (0, 2, 15.5),
    Q.Q6_K: (208, None, 0.0),
}


def random_blocks(rng, qtype, rows, cols):
    """Random blocks of `qtype` for a (rows, cols) matrix, scaled so the
    decoded values have std WEIGHT_STD. Returns (bytes (rows, row_bytes), values)."""
    bv, bb = GGML_QUANT_SIZES[qtype]
    assert cols % bv == 0, f"{qtype.name}: {cols} columns are not whole blocks of {bv}"
    n = rows * cols // bv
    blocks = rng.integers(0, 256, size=(n, bb), dtype=np.uint8)
    d_off, m_off, ratio = SCALE_FIELDS[qtype]
    # Scales vary from block to block, so a decoder that reads the wrong
    # block's scale is caught.
    d = rng.uniform(0.5, 1.5, size=n)

    def encode(scale):
        blocks[:, d_off:d_off + 2] = (d * scale).astype(np.float16).view(np.uint8).reshape(n, 2)
        if m_off is not None:
            blocks[:, m_off:m_off + 2] = (d * scale * ratio).astype(np.float16).view(np.uint8).reshape(n, 2)
        return dequantize(blocks.reshape(rows, -1), qtype).reshape(rows, cols)

    scale = WEIGHT_STD / encode(1e-2).std() * 1e-2
    values = encode(scale)
    return blocks.reshape(rows, -1).copy(), values


def f32_param(name, shape, rng):
    """Norm weights 1 + N(0, 0.1), biases N(0, 0.1), routers N(0, WEIGHT_STD)."""
    if "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (WEIGHT_STD * rng.standard_normal(shape)).astype(np.float32)


def write_gguf(path, arch, cfg, formats, seed):
    """Writes the checkpoint; returns {gguf tensor name: format name}."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    a = arch
    C, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w.add_string("general.name", f"lynx-tiny-{arch}")
    w.add_uint32(f"{a}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", C)
    w.add_uint32(f"{a}.block_count", L)
    w.add_uint32(f"{a}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{a}.attention.head_count", H)
    w.add_uint32(f"{a}.attention.head_count_kv", KV)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.vocab_size", V)
    if arch == "llama":
        w.add_uint32(f"{a}.rope.dimension_count", D)
    else:
        w.add_uint32(f"{a}.attention.key_length", D)
        w.add_uint32(f"{a}.attention.value_length", D)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        w.add_uint32(f"{a}.expert_count", experts)
        w.add_uint32(f"{a}.expert_used_count", cfg.num_experts_per_tok)
        w.add_uint32(f"{a}.expert_feed_forward_length", inter)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_uint32(f"{a}.expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size)

    used = {}

    def matrix(name, role, shape):
        qtype = formats[role]
        rows = int(np.prod(shape[:-1]))
        raw, _ = random_blocks(rng, qtype, rows, shape[-1])
        w.add_tensor(name, raw.reshape(*shape[:-1], raw.shape[-1]), raw_dtype=qtype)
        used[name] = qtype.name

    def vector(name, shape):
        w.add_tensor(name, f32_param(name, shape, rng))
        used[name] = "F32"

    matrix("token_embd.weight", "token_embd", (V, C))
    for l in range(L):
        p = f"blk.{l}"
        vector(f"{p}.attn_norm.weight", (C,))
        matrix(f"{p}.attn_q.weight", "attn_q", (H * D, C))
        matrix(f"{p}.attn_k.weight", "attn_k", (KV * D, C))
        matrix(f"{p}.attn_v.weight", "attn_v", (KV * D, C))
        if arch in ("qwen2", "qwen2moe"):
            vector(f"{p}.attn_q.bias", (H * D,))
            vector(f"{p}.attn_k.bias", (KV * D,))
            vector(f"{p}.attn_v.bias", (KV * D,))
        if arch in ("qwen3", "qwen3moe"):
            vector(f"{p}.attn_q_norm.weight", (D,))
            vector(f"{p}.attn_k_norm.weight", (D,))
        if arch == "olmoe":
            vector(f"{p}.attn_q_norm.weight", (H * D,))
            vector(f"{p}.attn_k_norm.weight", (KV * D,))
        matrix(f"{p}.attn_output.weight", "attn_output", (C, H * D))
        vector(f"{p}.ffn_norm.weight", (C,))
        if experts:
            inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            vector(f"{p}.ffn_gate_inp.weight", (experts, C))
            matrix(f"{p}.ffn_gate_exps.weight", "ffn_gate_exps", (experts, inter, C))
            matrix(f"{p}.ffn_up_exps.weight", "ffn_up_exps", (experts, inter, C))
            matrix(f"{p}.ffn_down_exps.weight", "ffn_down_exps", (experts, C, inter))
            si = getattr(cfg, "shared_expert_intermediate_size", None)
            if si:
                # llama.cpp's converter keeps the (1, C) shape of the gate.
                vector(f"{p}.ffn_gate_inp_shexp.weight", (1, C))
                matrix(f"{p}.ffn_gate_shexp.weight", "ffn_gate_shexp", (si, C))
                matrix(f"{p}.ffn_up_shexp.weight", "ffn_up_shexp", (si, C))
                matrix(f"{p}.ffn_down_shexp.weight", "ffn_down_shexp", (C, si))
        else:
            matrix(f"{p}.ffn_gate.weight", "ffn_gate", (cfg.intermediate_size, C))
            matrix(f"{p}.ffn_up.weight", "ffn_up", (cfg.intermediate_size, C))
            matrix(f"{p}.ffn_down.weight", "ffn_down", (C, cfg.intermediate_size))
    vector("output_norm.weight", (C,))
    if formats["output"] is not None:
        matrix("output.weight", "output", (V, C))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return used


def state_dict_from_gguf(path, arch, cfg):
    """The transformers state dict of the file's dequantised weights."""
    r = GGUFReader(str(path))
    t = {}
    for ti in r.tensors:
        shape = [int(x) for x in reversed(ti.shape)]
        t[ti.name] = torch.from_numpy(dequantize(ti.data, ti.tensor_type).astype(np.float32).reshape(shape))
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    sd["lm_head.weight"] = t.get("output.weight", t["token_embd.weight"])
    for l in range(cfg.num_hidden_layers):
        p, m = f"blk.{l}", f"model.layers.{l}"
        q, k = t[f"{p}.attn_q.weight"], t[f"{p}.attn_k.weight"]
        if arch == "llama":
            q, k = torch.from_numpy(unpermute(q.numpy(), H)), torch.from_numpy(unpermute(k.numpy(), KV))
        sd[f"{m}.self_attn.q_proj.weight"] = q
        sd[f"{m}.self_attn.k_proj.weight"] = k
        sd[f"{m}.self_attn.v_proj.weight"] = t[f"{p}.attn_v.weight"]
        sd[f"{m}.self_attn.o_proj.weight"] = t[f"{p}.attn_output.weight"]
        for x in "qkv":
            if f"{p}.attn_{x}.bias" in t:
                sd[f"{m}.self_attn.{x}_proj.bias"] = t[f"{p}.attn_{x}.bias"]
        for x in "qk":
            if f"{p}.attn_{x}_norm.weight" in t:
                sd[f"{m}.self_attn.{x}_norm.weight"] = t[f"{p}.attn_{x}_norm.weight"]
        sd[f"{m}.input_layernorm.weight"] = t[f"{p}.attn_norm.weight"]
        sd[f"{m}.post_attention_layernorm.weight"] = t[f"{p}.ffn_norm.weight"]
        if f"{p}.ffn_gate_inp.weight" in t:
            sd[f"{m}.mlp.gate.weight"] = t[f"{p}.ffn_gate_inp.weight"]
            # transformers 5 stacks experts: gate rows then up rows per expert.
            sd[f"{m}.mlp.experts.gate_up_proj"] = torch.cat(
                [t[f"{p}.ffn_gate_exps.weight"], t[f"{p}.ffn_up_exps.weight"]], dim=1)
            sd[f"{m}.mlp.experts.down_proj"] = t[f"{p}.ffn_down_exps.weight"]
            if f"{p}.ffn_gate_shexp.weight" in t:
                for proj, role in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    sd[f"{m}.mlp.shared_expert.{proj}.weight"] = t[f"{p}.ffn_{role}_shexp.weight"]
                sd[f"{m}.mlp.shared_expert_gate.weight"] = t[f"{p}.ffn_gate_inp_shexp.weight"].reshape(1, -1)
        else:
            for proj, role in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                sd[f"{m}.mlp.{proj}.weight"] = t[f"{p}.ffn_{role}.weight"]
    return sd


def transformers_gguf_logits(path, seqs, expected_class):
    """Logits from transformers' own GGUF loader, or the reason it failed."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 - any failure is recorded, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    # transformers maps a llama-architecture GGUF with experts onto the dense
    # LlamaForCausalLM and silently drops the expert tensors; comparing that
    # model would test transformers' gap, not our mapping.
    if type(model).__name__ != expected_class:
        return None, f"it builds {type(model).__name__}, not {expected_class}"
    with torch.no_grad():
        return [model(input_ids=ids[None, :].long(), use_cache=False).logits[0].float() for ids in seqs], None


def build(name):
    arch, cfg_cls, model_cls, kwargs, formats, seed0 = SPECS[name]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    gguf_path = OUT_DIR / f"{name}.gguf"
    for seed in range(seed0, seed0 + 50):
        cfg = cfg_cls(**COMMON, **kwargs)
        cfg._attn_implementation = "eager"
        used = write_gguf(gguf_path, arch, cfg, formats, seed)
        model = model_cls(cfg).eval()
        missing, unexpected = model.load_state_dict(state_dict_from_gguf(gguf_path, arch, cfg), strict=False)
        # Rotary inv_freq buffers are not parameters; nothing else may be missing.
        missing = [k for k in missing if "rotary" not in k]
        assert not missing and not unexpected, (missing, unexpected)
        gen = torch.Generator().manual_seed(seed)
        seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=gen, dtype=torch.int64) for n in SEQ_LENS]
        top_k = getattr(cfg, "num_experts_per_tok", None)
        logits, gap = run_reference(model, seqs, top_k)
        if top_k is None or gap > MIN_GAP:
            break
        print(f"[{name}] seed {seed}: routing gap {gap:.2e} <= {MIN_GAP}, retrying")
    else:
        raise RuntimeError(f"{name}: no seed with a routing gap above {MIN_GAP}")

    hf, why = transformers_gguf_logits(gguf_path, seqs, model_cls.__name__)
    if hf is not None:
        cross = max((a - b).abs().max().item() for a, b in zip(hf, logits))
        assert cross < 1e-3, f"{name}: transformers' GGUF loader disagrees with our mapping by {cross}"
        cross_check = f"transformers gguf_file= load agrees: max |diff| {cross:.2e}"
    else:
        cross_check = f"transformers cannot load this GGUF itself ({why})"
    all_logits = torch.cat(logits)
    meta = dict(
        fixture=name, gguf_architecture=arch, hf_class=model_cls.__name__, seed=str(seed),
        min_routing_gap=str(gap), logits_std=f"{all_logits.std().item():.4f}",
        formats=json.dumps(used, sort_keys=True), cross_check=cross_check,
        torch_version=torch.__version__.split("+")[0], transformers_version=__import__("transformers").__version__,
    )
    tensors = {}
    for i, (ids, lg) in enumerate(zip(seqs, logits)):
        tensors[f"input_ids.{i}"] = ids.to(torch.int32)
        tensors[f"logits.{i}"] = lg
    write_safetensors(tensors, OUT_DIR / f"{name}.golden.safetensors", meta)
    print(f"[{name}] seed {seed}: {gguf_path.stat().st_size} bytes, logits std {meta['logits_std']}, "
          f"gap {gap}, {cross_check}")


if __name__ == "__main__":
    for n in sys.argv[1:] or list(SPECS):
        build(n)
