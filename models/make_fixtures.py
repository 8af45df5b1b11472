#!/usr/bin/env python3
"""Generate tiny random-weight golden fixtures for the Lynx runtime.

Writes ``models/fixtures/<name>/`` for each architecture below.  Every fixture
directory contains what ``save_pretrained`` writes (``config.json``,
``generation_config.json``, ``model.safetensors`` or shards + index) plus a
``golden.safetensors`` with reference logits:

    input_ids.0  int32   [7]
    input_ids.1  int32   [12]
    logits.0     float32 [7,  vocab]
    logits.1     float32 [12, vocab]
    metadata: torch / transformers versions, architecture, storage dtype,
              seed, min routing gap, ...

Reference logits are computed in float32, eager attention, batch of 1 without
padding, by *reloading the saved checkpoint from disk* with
``from_pretrained(..., dtype=float32)``.  For bf16/f16 fixtures the weights are
rounded to that dtype before saving, so the reference is exactly "stored
weights upcast to f32, computed in f32".

Weights are re-initialised from a seeded generator with a large std (so logits
are O(1), not ~0), norm weights are 1 + noise and biases are non-zero, so that a
runtime that ignores a norm weight or a bias fails the test.

For MoE fixtures the router logits of every MoE layer are captured with forward
hooks; for every token the gap between the k-th and (k+1)-th router probability
must exceed ``MIN_GAP`` (else the seed is bumped and everything regenerated), so
the expert selection is not sensitive to rounding differences.

Usage (from the repo root, inside the fixtures venv, see
models/requirements-fixtures.txt):

    HF_HUB_OFFLINE=1 python models/make_fixtures.py [name ...]

The output is deterministic for a given torch/transformers version.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from safetensors import safe_open
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

torch.set_num_threads(1)

OUT_DIR = Path(__file__).resolve().parent / "fixtures"
MIN_GAP = 1e-3
SEQ_LENS = (7, 12)
MAX_SEED_TRIES = 200

# Shared tiny dimensions.
COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    use_cache=True,
)
N_EXPERTS = 8
TOP_K = 2
EXPERT_INTER = 32
DENSE_INTER = 128
SHARED_INTER = 64  # qwen2_moe shared expert; deliberately != 32 and != 128

# name -> spec.  "init_std" was tuned so final logits have std ~1-2.
FIXTURES = {
    "llama": dict(
        cls=LlamaForCausalLM,
        cfg=LlamaConfig,
        kwargs=dict(intermediate_size=DENSE_INTER, tie_word_embeddings=True),
        dtype=torch.float32,
        init_std=0.2,
        seed=1000,
    ),
    "mixtral": dict(
        cls=MixtralForCausalLM,
        cfg=MixtralConfig,
        kwargs=dict(
            intermediate_size=EXPERT_INTER,  # Mixtral: per-expert FFN size
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
        dtype=torch.bfloat16,
        init_std=0.2,
        seed=2000,
    ),
    "olmoe": dict(
        cls=OlmoeForCausalLM,
        cfg=OlmoeConfig,
        kwargs=dict(
            intermediate_size=EXPERT_INTER,  # OLMoE: per-expert FFN size
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
        dtype=torch.float16,
        init_std=0.2,
        seed=3000,
    ),
    "qwen2_moe": dict(
        cls=Qwen2MoeForCausalLM,
        cfg=Qwen2MoeConfig,
        kwargs=dict(
            num_hidden_layers=3,
            intermediate_size=DENSE_INTER,  # dense layers (mlp_only_layers)
            moe_intermediate_size=EXPERT_INTER,
            shared_expert_intermediate_size=SHARED_INTER,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            decoder_sparse_step=1,
            qkv_bias=True,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        dtype=torch.float32,
        init_std=0.2,
        seed=4000,
        max_shard_size=300_000,  # bytes -> several shards + index.json
    ),
    "qwen3_moe": dict(
        cls=Qwen3MoeForCausalLM,
        cfg=Qwen3MoeConfig,
        kwargs=dict(
            intermediate_size=DENSE_INTER,
            moe_intermediate_size=EXPERT_INTER,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        dtype=torch.float32,
        init_std=0.2,
        seed=5000,
    ),
    "qwen3_moe_stacked": dict(
        cls=Qwen3MoeForCausalLM,
        cfg=Qwen3MoeConfig,
        kwargs=dict(
            intermediate_size=DENSE_INTER,
            moe_intermediate_size=EXPERT_INTER,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        dtype=torch.float32,
        init_std=0.2,
        seed=6000,
        save_original_format=False,  # transformers-5 fused expert tensors
    ),
}


_ST_DTYPES = {torch.float32: "F32", torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(tensors: dict, path, metadata: dict) -> None:
    """Byte-deterministic safetensors writer (sorted tensor names and metadata keys).

    ``safetensors.torch.save_file`` serialises the metadata from a hash map, so
    its header key order (and hence the file hash) changes between runs.
    """
    header, chunks, off = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(len(hjson).to_bytes(8, "little"))
        f.write(hjson)
        for c in chunks:
            f.write(c)
    os.chmod(path, 0o644)


def reinit_(model: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    """Deterministically overwrite every parameter.

    * RMSNorm weights (1-D params whose name contains "norm"): 1 + 0.1*N(0,1)
    * biases: 0.1*N(0,1)
    * everything else (linears, embeddings, fused experts, routers): std*N(0,1)
    Tied parameters are visited once (named_parameters de-duplicates).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def router_modules(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]


@torch.no_grad()
def run_reference(model, seqs, top_k: int | None):
    """Return per-sequence logits (f32 [T,V]) and the min top-k routing gap."""
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(out[0].detach().float()))
             for _, m in router_modules(model)]
    logits, min_gap = [], float("inf")
    try:
        for ids in seqs:
            captured.clear()
            out = model(input_ids=ids[None, :].long(), use_cache=False)
            logits.append(out.logits[0].float().contiguous())
            for rl in captured:
                probs = torch.softmax(rl, dim=-1)
                srt = probs.sort(dim=-1, descending=True).values
                gap = (srt[:, top_k - 1] - srt[:, top_k]).min().item()
                min_gap = min(min_gap, gap)
    finally:
        for h in hooks:
            h.remove()
    return logits, (min_gap if top_k else None)


def build_one(name: str, spec: dict) -> dict:
    out = OUT_DIR / name
    cfg_kwargs = dict(COMMON)
    cfg_kwargs.update(spec["kwargs"])
    cfg_kwargs["initializer_range"] = spec["init_std"]
    is_moe = "num_experts_per_tok" in cfg_kwargs
    top_k = cfg_kwargs["num_experts_per_tok"] if is_moe else None

    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        torch.manual_seed(seed)
        config = spec["cfg"](**cfg_kwargs)
        config._attn_implementation = "eager"
        model = spec["cls"](config).eval()
        gen = torch.Generator().manual_seed(seed)
        reinit_(model, spec["init_std"], gen)
        # Round the *parameters* to the storage dtype (no-op for f32) but keep
        # computing in f32.  (Not model.to(dtype): that would also round
        # buffers such as RoPE inv_freq, which are recomputed on load.)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(spec["dtype"]).to(torch.float32))
        seqs = [torch.randint(3, cfg_kwargs["vocab_size"], (n,), generator=gen, dtype=torch.int64)
                for n in SEQ_LENS]
        logits_mem, gap = run_reference(model, seqs, top_k)
        if not is_moe or gap > MIN_GAP:
            break
        print(f"[{name}] seed {seed}: min routing gap {gap:.2e} <= {MIN_GAP}, retrying")
    else:
        raise RuntimeError(f"{name}: no seed with routing gap > {MIN_GAP}")

    # Save in the storage dtype.
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_kwargs = {}
    if "max_shard_size" in spec:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    if "save_original_format" in spec:
        save_kwargs["save_original_format"] = spec["save_original_format"]
    model.to(spec["dtype"]).save_pretrained(out, **save_kwargs)
    del model

    # Reload from disk in f32 and recompute: this is the reference.
    model = spec["cls"].from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    logits, gap2 = run_reference(model, seqs, top_k)
    for a, b in zip(logits, logits_mem):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if is_moe:
        assert gap2 > MIN_GAP, gap2

    tensors = {}
    for i, (ids, lg) in enumerate(zip(seqs, logits)):
        tensors[f"input_ids.{i}"] = ids.to(torch.int32).contiguous()
        tensors[f"logits.{i}"] = lg
    all_logits = torch.cat(logits)
    meta = {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "fixture": name,
        "storage_dtype": str(spec["dtype"]).replace("torch.", ""),
        "compute_dtype": "float32",
        "attn_implementation": "eager",
        "seed": str(seed),
        "init_std": str(spec["init_std"]),
        "min_routing_gap": "" if gap2 is None else f"{gap2:.6g}",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "logits_std": f"{all_logits.std().item():.6g}",
    }
    write_safetensors(tensors, out / "golden.safetensors", meta)
    for f in out.iterdir():
        os.chmod(f, 0o644)  # save_pretrained's safetensors files are 0600

    # Summary for the report.
    layer0 = {}
    for f in sorted(out.glob("model*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if ".layers.0." in k:
                    sl = sf.get_slice(k)
                    layer0[k] = (list(sl.get_shape()), sl.get_dtype(), f.name)
    size = sum(p.stat().st_size for p in out.iterdir())
    info = dict(name=name, seed=seed, min_gap=gap2, logits_std=all_logits.std().item(),
                logits_absmax=all_logits.abs().max().item(), bytes=size,
                files=sorted(p.name for p in out.iterdir()), layer0=dict(sorted(layer0.items())))
    print(f"[{name}] seed={seed} logits std={info['logits_std']:.3f} absmax={info['logits_absmax']:.2f} "
          f"min_gap={gap2} size={size} files={info['files']}")
    return info


def main(argv):
    names = argv or list(FIXTURES)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    infos = [build_one(n, FIXTURES[n]) for n in names]
    summary = os.environ.get("LYNX_FIXTURE_SUMMARY")  # optional: dump per-fixture info as JSON
    if summary:
        with open(summary, "w") as f:
            json.dump(infos, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
