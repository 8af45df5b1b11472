// Drives the viewer page (index.html, the egui app on a canvas) in Debian's
// headless Chromium for the end-to-end test (tests/tests/web_e2e.rs):
//
//   node web/e2e/viewer.mjs <page url with ?script=...> <screenshot.png>
//
// The page runs the viewer's own scripted exchange (the native viewer's
// `--script`), which drives the app's state as clicks do. This waits until
// the script has finished (window.lynxViewer's snapshot has `script_exit`),
// takes a screenshot of the page, and prints one JSON object on stdout:
// `{ error, backend, snapshot, seconds }`. Browser console lines go to
// stderr. Chromium starts as chromium.mjs says.

import { launchChromium } from "./chromium.mjs";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node viewer.mjs <page url> <screenshot.png>");
  process.exit(2);
}
const { browser, close } = await launchChromium();
let exit = 0;
try {
  const page = browser.pages()[0] || (await browser.newPage());
  await page.setViewportSize({ width: 1400, height: 900 });
  page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  const t0 = Date.now();
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.lynxViewer && (window.lynxViewer.ready || window.lynxViewer.error), null, {
    timeout: 5 * 60 * 1000,
    polling: 100,
  });
  // The script ends by itself (its own timeout fails it); this bound is a
  // last resort against a page that stopped drawing.
  await page.waitForFunction(
    () => {
      const v = window.lynxViewer;
      if (v.error) return true;
      const p = v.viewer && v.viewer.panicMessage();
      if (p) return true;
      const s = v.viewer && v.viewer.snapshot();
      return s && JSON.parse(s).script_exit !== null;
    },
    null,
    { timeout: 25 * 60 * 1000, polling: 500 }
  );
  const result = await page.evaluate(() => {
    const v = window.lynxViewer;
    if (v.error) return { error: v.error };
    const panic = v.viewer.panicMessage();
    return {
      error: panic ? `the app panicked: ${panic}` : null,
      backend: JSON.parse(v.viewer.backend()),
      snapshot: JSON.parse(v.viewer.snapshot()),
    };
  });
  result.seconds = (Date.now() - t0) / 1000;
  await page.screenshot({ path: screenshot });
  process.stdout.write(JSON.stringify(result) + "\n");
} catch (e) {
  console.error(`viewer driver: ${e.stack || e}`);
  exit = 1;
} finally {
  await close();
}
process.exit(exit);
