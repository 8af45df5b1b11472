#!/usr/bin/env python3
"""Writes models/fixtures/quants/blocks.safetensors: random blocks of every
GGUF quant format Lynx decodes, with gguf-py's dequantisation of them.

gguf-py's `gguf.quants.dequantize` is a NumPy transcription of ggml's
`dequantize_row_*`, independent of Lynx; the Rust test
`tensor::tests::dequantize_matches_gguf_py_fixture` decodes the same bytes
and requires agreement within 1e-6 relative.

Every block is random bytes, except the f16 scale fields (d, and dmin or m
where the format has one), which are set to finite values with magnitude in
[1e-3, 1e-1] and random sign, so that the values are sane and every bit of
the quantised payload is exercised. Versions: gguf 0.19.0, numpy 2.4.6,
safetensors 0.8.0 (models/requirements-fixtures.txt).

For each format F the file holds `F.bytes` (u8, [blocks, bytes per block])
and `F.values` (f32, [blocks, values per block]).
"""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors.numpy import save_file

# format: (ggml type, bytes per block, byte offsets of f16 scale fields, blocks)
FORMATS = {
    "Q4_0": (T.Q4_0, 18, [0], 256),
    "Q4_1": (T.Q4_1, 20, [0, 2], 256),
    "Q5_0": (T.Q5_0, 22, [0], 256),
    "Q5_1": (T.Q5_1, 24, [0, 2], 256),
    "Q8_0": (T.Q8_0, 34, [0], 256),
    "Q2_K": (T.Q2_K, 84, [80, 82], 64),
    "Q3_K": (T.Q3_K, 110, [108], 64),
    "Q4_K": (T.Q4_K, 144, [0, 2], 64),
    "Q5_K": (T.Q5_K, 176, [0, 2], 64),
    "Q6_K": (T.Q6_K, 210, [208], 64),
}


def main() -> None:
    rng = np.random.default_rng(20261206)
    out = {}
    for name, (qtype, nbytes, scale_offsets, nblocks) in FORMATS.items():
        blocks = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
        for off in scale_offsets:
            mag = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=nblocks))
            sign = rng.choice([-1.0, 1.0], size=nblocks)
            f = (mag * sign).astype(np.float16)
            blocks[:, off : off + 2] = f.view(np.uint8).reshape(nblocks, 2)
        values = dequantize(blocks, qtype).astype(np.float32)
        assert np.isfinite(values).all(), name
        out[f"{name}.bytes"] = np.ascontiguousarray(blocks)
        out[f"{name}.values"] = np.ascontiguousarray(values.reshape(nblocks, -1))
    path = Path(__file__).resolve().parent / "fixtures" / "quants" / "blocks.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(out.items())), str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
