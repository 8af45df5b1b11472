// The demo page: a thin DOM layer over the wasm `Demo` (web/src/lib.rs).
// Everything that touches the model lives in Rust; this file only wires
// buttons to calls and paints what the calls report.
//
// Address options: `?cpu` forces the CPU fallback, `?autoload` loads the
// demo model at once (the end-to-end test uses both, the latter always).

import init, { Demo } from "./pkg/lynx_web.js";

const DEMO_MODEL = "lynx-moe-135m.Q4_0.gguf";
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// What the end-to-end test reads; also handy in the console.
window.lynx = { ready: false, loaded: false, error: null, backend: null, steps: [] };

function fail(where, e) {
  const msg = `${where}: ${e && e.message ? e.message : e}`;
  console.error(msg);
  window.lynx.error = msg;
  const box = $("backend");
  box.className = "note err";
  box.textContent = msg;
}

function mib(n) {
  return (n / (1 << 20)).toFixed(1);
}

// wgpu's adapter info is mostly empty in the browser, so the page asks the
// browser too (GPUAdapterInfo: vendor and architecture).
async function browserAdapter() {
  try {
    const a = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    if (!a) {
      return "";
    }
    const i = a.info || {};
    const fallback = (a.isFallbackAdapter ?? i.isFallbackAdapter)
      ? ", a software fallback adapter (the CPU path, ?cpu, may well be faster here)"
      : "";
    return [i.vendor, i.architecture, i.device, i.description].filter((x) => x).join(" ") + fallback;
  } catch (e) {
    return "";
  }
}

function showBackend(info, browserView) {
  const box = $("backend");
  if (info.kind === "webgpu") {
    box.className = "note ok";
    const name = info.adapter_name || browserView || "(unnamed)";
    box.textContent = `WebGPU: adapter "${name}", ${info.adapter_backend}, device type ${info.device_type}` +
      `${info.driver ? ", driver " + info.driver : ""}; ${info.message}.`;
  } else {
    box.className = "note warn";
    box.textContent = info.message +
      " The whole model is held in wasm memory for the CPU path, and the expert readout needs WebGPU.";
  }
}

let demo = null;

function setBusy(busy) {
  $("load-demo").disabled = busy;
  $("file").disabled = busy;
  $("run").disabled = busy || !window.lynx.loaded;
}

async function load(what) {
  setBusy(true);
  window.lynx.loaded = false;
  const started = performance.now();
  const onProgress = (got, total) => {
    $("progress").value = total ? got / total : 0;
    $("progress-text").textContent = `${mib(got)} / ${mib(total)} MiB`;
  };
  try {
    const name = typeof what === "string"
      ? await demo.loadUrl(what, onProgress)
      : await demo.loadFile(what, onProgress);
    const m = JSON.parse(demo.model());
    const s = ((performance.now() - started) / 1000).toFixed(1);
    $("progress-text").textContent = `${mib(m.bytes)} MiB in ${s} s`;
    $("model").textContent = `${name}: ${m.arch}, ${m.layers} layers, ${m.experts} experts (top-${m.top_k}), ` +
      `on the ${m.engine === "gpu" ? "GPU (weights streamed into GPU buffers)" : "CPU (weights in wasm memory)"}`;
    window.lynx.loaded = true;
    window.lynx.model = m;
    window.lynx.loadSeconds = Number(s);
  } catch (e) {
    fail(`loading ${typeof what === "string" ? what : what.name}`, e);
  } finally {
    setBusy(false);
  }
}

function paintExperts(metrics) {
  const grid = $("experts");
  if (!metrics || metrics.layers.length === 0) {
    return;
  }
  const e = metrics.layers[0].tokens_per_expert.length;
  grid.style.gridTemplateColumns = `repeat(${e}, 1fr)`;
  if (grid.children.length !== e * metrics.layers.length) {
    grid.replaceChildren(...Array.from({ length: e * metrics.layers.length }, () => document.createElement("div")));
  }
  const max = Math.max(1, ...metrics.layers.flatMap((l) => l.tokens_per_expert));
  metrics.layers.forEach((l, li) => {
    l.tokens_per_expert.forEach((n, ei) => {
      const shade = n === 0 ? 0 : 0.15 + 0.85 * (n / max);
      grid.children[li * e + ei].style.background = `rgba(75, 103, 201, ${shade})`;
    });
  });
}

async function run() {
  const prompts = $("prompts").value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
  if (prompts.length === 0) {
    return;
  }
  setBusy(true);
  $("result").hidden = true;
  $("result").removeAttribute("data-done");
  window.lynx.steps = [];
  const outs = prompts.map((p) => {
    const box = document.createElement("div");
    box.className = "out";
    const q = document.createElement("div");
    q.className = "q";
    q.textContent = p;
    const a = document.createElement("div");
    a.className = "a";
    box.append(q, a);
    return { box, a };
  });
  $("outputs").replaceChildren(...outs.map((o) => o.box));
  const request = {
    prompts,
    chat: true,
    max_new_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    seed: 0,
  };
  try {
    const report = JSON.parse(await demo.generate(
      JSON.stringify(request),
      (seq, text) => { outs[seq].a.textContent += text; },
      (json) => {
        const step = JSON.parse(json);
        window.lynx.steps.push({ step: step.step, phase: step.phase, sequences: step.sequences, ms: step.ms });
        let line = `step ${step.step} (${step.phase}, ${step.sequences} sequences): ${step.ms.toFixed(0)} ms`;
        if (!step.metrics) {
          line += " (the expert readout comes from the GPU engine's step metrics)";
        } else {
          const m = step.metrics;
          const distinct = m.layers.reduce((s, l) => s + l.distinct_selected, 0) / m.layers.length;
          line += `; ${m.tokens} tokens, on average ${distinct.toFixed(1)} of ${m.layers[0].tokens_per_expert.length}` +
            ` experts active per layer (policy ${m.policy})`;
          paintExperts(m);
        }
        $("step-stats").textContent = line;
      },
    ));
    $("run-stats").textContent = `prefill ${report.prefill_ms.toFixed(0)} ms; decode ` +
      `${report.decode_tokens} tokens at ${report.decode_tokens_per_s.toFixed(2)} tokens/s (${report.engine})`;
    $("result").textContent = JSON.stringify(report);
    $("result").setAttribute("data-done", "1");
    window.lynx.report = report;
  } catch (e) {
    fail("generating", e);
    $("result").textContent = JSON.stringify({ error: String(e && e.message ? e.message : e) });
    $("result").setAttribute("data-done", "1");
  } finally {
    setBusy(false);
  }
}

async function main() {
  try {
    await init();
    demo = await Demo.create(params.has("cpu"));
  } catch (e) {
    fail("starting the wasm module", e);
    return;
  }
  const info = JSON.parse(demo.backend());
  window.lynx.backend = info;
  const view = info.kind === "webgpu" ? await browserAdapter() : "";
  window.lynx.browserAdapter = view;
  showBackend(info, view);
  $("load-demo").onclick = () => load(DEMO_MODEL);
  $("file").onchange = (ev) => { if (ev.target.files.length > 0) load(ev.target.files[0]); };
  $("run").onclick = run;
  setBusy(false);
  window.lynx.ready = true;
  if (params.has("autoload")) {
    await load(DEMO_MODEL);
  }
}

main();
