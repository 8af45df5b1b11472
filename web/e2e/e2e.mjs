// Drives the demo page in Debian's headless Chromium (never a downloaded
// browser) for the end-to-end test (tests/tests/web_e2e.rs), which starts
// the server and compares the output with the native runtime's.
//
//   node web/e2e/e2e.mjs <page url> <request json> <screenshot.png> [runs] [model file]
//
// With a model file, the page loads it through its file picker (the
// `File.stream()` path) instead of fetching it (`?autoload` in the url).
// LYNX_E2E_HIDE_WEBGPU=1 removes `navigator.gpu` before the page runs, as
// in a browser without WebGPU.
// Runs the request `runs` times (default 1) in the same page: the first run
// compiles the GPU pipelines, later ones show the warm speed. Prints one
// JSON object on stdout: the backend and model the page reports, the
// browser's own view of its WebGPU adapter, and one generation report per
// run. Browser console lines go to stderr.

import { launchChromium } from "./chromium.mjs";

const [url, requestJson, screenshot, runsArg, modelFile] = process.argv.slice(2);
const runs = Number(runsArg || 1);
if (!url || !requestJson || !screenshot) {
  console.error("usage: node e2e.mjs <page url> <request json> <screenshot.png>");
  process.exit(2);
}
const request = JSON.parse(requestJson);
const { browser, close } = await launchChromium();
let exit = 0;
try {
  const page = browser.pages()[0] || (await browser.newPage());
  await page.setViewportSize({ width: 1200, height: 1000 });
  if (process.env.LYNX_E2E_HIDE_WEBGPU === "1") {
    await page.addInitScript(() => {
      delete Navigator.prototype.gpu;
    });
  }
  page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  await page.goto(url, { waitUntil: "load" });

  const gpu = await page.evaluate(async () => {
    if (!navigator.gpu) {
      return { available: false };
    }
    const a = await navigator.gpu.requestAdapter();
    if (!a) {
      return { available: true, adapter: null };
    }
    const i = a.info || {};
    return {
      available: true,
      adapter: { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description },
      isFallbackAdapter: a.isFallbackAdapter ?? i.isFallbackAdapter ?? null,
      features: [...a.features].sort(),
      maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize,
      maxBufferSize: a.limits.maxBufferSize,
    };
  });

  if (modelFile) {
    await page.waitForFunction(() => window.lynx && (window.lynx.ready || window.lynx.error), null, {
      timeout: 5 * 60 * 1000,
      polling: 100,
    });
    await page.setInputFiles("#file", modelFile);
  }
  await page.waitForFunction(() => window.lynx && (window.lynx.loaded || window.lynx.error), null, {
    timeout: 15 * 60 * 1000,
    polling: 250,
  });
  const loaded = await page.evaluate(() => ({
    error: window.lynx.error,
    backend: window.lynx.backend,
    model: window.lynx.model,
    modelName: document.getElementById("model").textContent,
    loadSeconds: window.lynx.loadSeconds,
  }));
  const reports = [];
  let steps = [];
  for (let i = 0; i < runs && !loaded.error; i++) {
    await page.fill("#prompts", request.prompts.join("\n"));
    await page.fill("#max-tokens", String(request.max_new_tokens));
    await page.fill("#temperature", "0");
    await page.click("#run");
    // The page removes data-done when a run starts and sets it at the end.
    await page.waitForSelector('#result[data-done="1"]', { state: "attached", timeout: 30 * 60 * 1000 });
    reports.push(JSON.parse(await page.textContent("#result")));
    steps = await page.evaluate(() => window.lynx.steps);
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  process.stdout.write(JSON.stringify({ gpu, ...loaded, reports, steps }) + "\n");
} catch (e) {
  console.error(`e2e driver: ${e.stack || e}`);
  exit = 1;
} finally {
  await close();
}
process.exit(exit);
