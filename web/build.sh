#!/usr/bin/env bash
# Builds the browser demo into one folder (default: target/web-site):
# the wasm module and its JS glue (wasm-bindgen --target web), the page, and
# the demo model. Serve it with `cargo run -p lynx-cli -- web`.
#
# Needs: rustup target wasm32-unknown-unknown, and wasm-bindgen-cli at the
# version of the wasm-bindgen crate in Cargo.lock (.ci/run installs both).
# Uses the workspace's one build profile (dev, at opt-level 2).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="${1:-$root/target/web-site}"
cd "$root"

want="$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')"
if ! command -v wasm-bindgen >/dev/null; then
  echo "web/build.sh: wasm-bindgen is missing; install it with: cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi
have="$(wasm-bindgen --version | awk '{print $2}')"
if [ "$have" != "$want" ]; then
  echo "web/build.sh: wasm-bindgen $have does not match the crate's $want; run: cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  echo "web/build.sh: the wasm32 target is missing; run: rustup target add wasm32-unknown-unknown" >&2
  exit 1
fi

cargo build -p lynx-web --target wasm32-unknown-unknown
mkdir -p "$site/pkg"
wasm-bindgen --target web --no-typescript --out-dir "$site/pkg" \
  target/wasm32-unknown-unknown/debug/lynx_web.wasm
cp web/index.html web/viewer.js web/lite.html web/lite.js "$site/"
# A hard link when the site is on the same file system: the model is 75 MiB.
model=models/lynx-moe-135m/lynx-moe-135m.Q4_0.gguf
ln -f "$model" "$site/" 2>/dev/null || cp "$model" "$site/"
echo "site: $site"
