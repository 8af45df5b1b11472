"""Reference logits for a Lynx-written GGUF (llama arch, dense or Mixtral experts).

Reads the GGUF with the `gguf` package, dequantises every tensor to f32,
undoes llama.cpp's Q/K row permutation, loads the weights into transformers'
MixtralForCausalLM (or LlamaForCausalLM when the file has no experts) built
from the GGUF metadata, and records, for fixed token sequences:
  - the top-20 (id, logit) at every position and the argmax at every position,
  - greedy continuations (token ids and text) of given chat prompts.
So the Rust golden test compares against transformers on exactly the
weights we ship (no quantisation error in the comparison).
With --ppl-file it also reports the held-out perplexity of those weights
(protocol of models/eval/README.md: the whole file tokenized, windows of 256
tokens, tokens 1..255 of each scored).

Usage:
  python models/make_gguf_golden.py MODEL.gguf TOKENIZER_DIR OUT.json \
      --text-file models/eval/heldout.txt --chat "What is the capital of France?" \
      [--ppl-file models/eval/heldout.txt]
Versions: models/requirements-fixtures.txt (= models/requirements-demo.txt).
"""

import argparse
import json
import math

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM


def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def unpermute(w, n_head):
    # Inverse of llama.cpp's `w.reshape(H, 2, D//2, C).swapaxes(1, 2).reshape(H*D, C)`.
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load(path):
    r = GGUFReader(path)
    assert field(r, "general.architecture") == "llama", "only llama-arch GGUF files"
    g = lambda k: field(r, "llama." + k)
    experts = g("expert_count") or 0
    common = dict(
        vocab_size=g("vocab_size"),
        hidden_size=g("embedding_length"),
        num_hidden_layers=g("block_count"),
        num_attention_heads=g("attention.head_count"),
        num_key_value_heads=g("attention.head_count_kv"),
        head_dim=g("rope.dimension_count"),
        max_position_embeddings=g("context_length"),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"),
        rope_theta=g("rope.freq_base"),
        tie_word_embeddings="output.weight" not in {t.name for t in r.tensors},
    )
    if experts:
        cfg = MixtralConfig(
            intermediate_size=g("expert_feed_forward_length"),
            num_local_experts=experts,
            num_experts_per_tok=g("expert_used_count"),
            sliding_window=None,
            **common,
        )
        model = MixtralForCausalLM(cfg)
    else:
        cfg = LlamaConfig(intermediate_size=g("feed_forward_length"), **common)
        model = LlamaForCausalLM(cfg)
    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = w.reshape([int(d) for d in reversed(t.shape)])
    sd = {}
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    sd["model.embed_tokens.weight"] = tensors["token_embd.weight"]
    sd["model.norm.weight"] = tensors["output_norm.weight"]
    if "output.weight" in tensors:
        sd["lm_head.weight"] = tensors["output.weight"]
    for l in range(cfg.num_hidden_layers):
        b, p = f"blk.{l}.", f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = tensors[b + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = tensors[b + "ffn_norm.weight"]
        sd[p + "self_attn.q_proj.weight"] = unpermute(tensors[b + "attn_q.weight"], H)
        sd[p + "self_attn.k_proj.weight"] = unpermute(tensors[b + "attn_k.weight"], KV)
        sd[p + "self_attn.v_proj.weight"] = tensors[b + "attn_v.weight"]
        sd[p + "self_attn.o_proj.weight"] = tensors[b + "attn_output.weight"]
        if experts:
            sd[p + "mlp.gate.weight"] = tensors[b + "ffn_gate_inp.weight"]
            gate, up, down = (tensors[b + f"ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))
            # transformers 5 keeps Mixtral experts stacked in memory: gate_up (E, 2I, C), down (E, C, I).
            sd[p + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
            sd[p + "mlp.experts.down_proj"] = down
        else:
            for n, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                sd[p + f"mlp.{hf}.weight"] = tensors[b + f"ffn_{n}.weight"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not missing, f"unmapped parameters: {missing[:5]}"
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), cfg


@torch.no_grad()
def perplexity(model, tok, text, seq=256, bs=4):
    ids = tok(text)["input_ids"]
    n = len(ids) // seq
    wins = torch.tensor(ids[: n * seq]).view(n, seq)
    nll, count = 0.0, 0
    for i in range(0, n, bs):
        x = wins[i : i + bs]
        lg = model(input_ids=x, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(
            lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    return {"text_bytes": len(text.encode()), "windows": n, "tokens_scored": count, "ppl": math.exp(nll / count)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("out")
    ap.add_argument("--text-file")
    ap.add_argument("--lengths", default="8,16")
    ap.add_argument("--chat", action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--ppl-file", help="also measure held-out perplexity on this text")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, cfg = load(a.gguf)
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    out = {"gguf": a.gguf.split("/")[-1], "torch_version": torch.__version__, "sequences": [], "chats": []}
    if a.text_file:
        ids = tok(open(a.text_file).read()[:4000])["input_ids"]
        start = 0
        for n in map(int, a.lengths.split(",")):
            seq = ids[start : start + n]
            start += n
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0].float()
            top = torch.topk(logits[-1], 20)
            tops = torch.topk(logits, 20, dim=-1)
            out["sequences"].append({
                "ids": seq,
                "argmax": logits.argmax(-1).tolist(),
                "last_top20": [[int(i), float(v)] for i, v in zip(top.indices, top.values)],
                "top20": [[[int(i), float(v)] for i, v in zip(ii, vv)] for ii, vv in zip(tops.indices, tops.values)],
                "margins": (lambda s: (s[:, 0] - s[:, 1]).tolist())(torch.sort(logits, -1, descending=True).values),
            })
    for prompt in a.chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            res = model.generate(torch.tensor([ids]), max_new_tokens=a.max_new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        gen = res.sequences[0][len(ids):]
        # top-1 minus top-2 logit at each greedy step: how robust the path is to tiny errors
        margins = [float(v[0] - v[1]) for v in (torch.topk(l[0].float(), 2).values for l in res.logits)]
        out["chats"].append({
            "prompt": prompt, "prompt_ids": ids, "greedy_ids": gen.tolist(),
            "greedy_text": tok.decode(gen, skip_special_tokens=True),
            "greedy_margins": margins,
        })
    if a.ppl_file:
        out["ppl"] = perplexity(model, tok, open(a.ppl_file).read())
    json.dump(out, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "sequences"}, indent=1)[:2000])


if __name__ == "__main__":
    main()
