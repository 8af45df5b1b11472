// The Lynx viewer page: mounts the desktop viewer's egui app (lynx-web's
// `viewer` module) on the canvas. The app loads the demo model, chats in
// tabs that decode as one batch, and plots expert selection live.
//
// Address options: `?autoload` loads the demo model at once; `?script=chat`
// (or `docqa`) runs the scripted exchange of the native viewer's `--script`,
// with `&max_tokens=N` and `&switch=0` (stay on exact routing); `?cpu` runs
// the model on the CPU reference. The app draws with WebGL; the model runs
// on WebGPU, or on the CPU reference where the browser has none.
//
// `window.lynxViewer` is what tests read: `{ ready, error, viewer }`, where
// `viewer.snapshot()` is the app's state as JSON.

import init, { startViewer } from "./pkg/lynx_web.js";

const MODEL_URL = "lynx-moe-135m.Q4_0.gguf";
const params = new URLSearchParams(location.search);
const note = document.getElementById("note");
const file = document.getElementById("file");
window.lynxViewer = { ready: false, error: null, viewer: null };

function fail(message) {
  window.lynxViewer.error = message;
  const box = document.getElementById("error");
  box.textContent = message;
  box.style.display = "block";
  document.getElementById("viewer").style.display = "none";
  note.textContent = "The viewer could not start.";
}

async function main() {
  await init();
  const maxTokens = params.get("max_tokens");
  const options = {
    model_url: MODEL_URL,
    autoload: params.has("autoload"),
    script: params.get("script"),
    max_tokens: maxTokens ? Number(maxTokens) : null,
    switch_to_lynx: params.get("switch") === "0" ? false : null,
    force_cpu: params.has("cpu"),
  };
  const viewer = await startViewer("viewer", JSON.stringify(options));
  window.lynxViewer.viewer = viewer;
  window.lynxViewer.ready = true;
  const backend = JSON.parse(viewer.backend());
  note.textContent =
    backend.kind === "webgpu"
      ? `Model on WebGPU: ${backend.adapter_name || "browser adapter"} (${backend.message})`
      : backend.message;
  file.disabled = false;
  file.addEventListener("change", () => {
    if (file.files.length > 0) viewer.loadFile(file.files[0]);
  });
}

main().catch((e) => fail(`The viewer failed to start: ${e && e.message ? e.message : e}`));
