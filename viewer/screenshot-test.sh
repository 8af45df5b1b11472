#!/usr/bin/env bash
# Runs the viewer's scripted exchange in a real window under Xvfb and saves
# a screenshot: `viewer/screenshot-test.sh [chat|docqa] [OUT.png]`.
# `cargo test -p lynx-viewer` runs the same thing (tests/screenshot_e2e.rs);
# this script is for looking at other scripts or models by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
script="${1:-chat}"
out="${2:-target/tmp/lynx-viewer/manual-$script.png}"
command -v Xvfb >/dev/null || { echo "needs Xvfb: apt-get install xvfb" >&2; exit 1; }
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
  export XDG_RUNTIME_DIR="$(mktemp -d)"
  chmod 700 "$XDG_RUNTIME_DIR"
fi
n=90
while [ -e "/tmp/.X11-unix/X$n" ] || [ -e "/tmp/.X$n-lock" ]; do n=$((n + 1)); done
Xvfb ":$n" -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -e "/tmp/.X11-unix/X$n" ] && break; sleep 0.1; done
# Built the way the tests build it (with their dev-dependency features), so
# that this reuses the test build instead of compiling wgpu a second time.
cargo test -p lynx-viewer --no-run
mkdir -p "$(dirname "$out")"
DISPLAY=":$n" target/debug/lynx-viewer --script "$script" --max-tokens "${MAX_TOKENS:-16}" --screenshot "$out"
size=$(stat -c %s "$out")
[ "$size" -gt 20000 ] || { echo "screenshot $out is only $size bytes" >&2; exit 1; }
echo "screenshot: $out ($size bytes)"
