// Starts Debian's headless Chromium (never a downloaded browser) for the
// end-to-end drivers (e2e.mjs, viewer.mjs), with a private, throw-away
// profile. LYNX_CHROMIUM names another binary.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

// The flags FACTS.md found to give headless Chromium a WebGPU adapter here
// (SwiftShader, on the CPU), plus no background traffic.
// LYNX_CHROMIUM_FLAGS adds more (e.g. to try Vulkan).
const ARGS = [
  "--no-sandbox",
  "--disable-quic",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--enable-unsafe-webgpu",
];

// Resolves to `{ browser, close }`: the persistent browser context, and a
// function that closes it and removes its profile.
export async function launchChromium() {
  const executablePath = process.env.LYNX_CHROMIUM || "/usr/lib/chromium/chromium";
  const profile = mkdtempSync(join(tmpdir(), "lynx-chromium-"));
  const args = [...ARGS, ...(process.env.LYNX_CHROMIUM_FLAGS ? process.env.LYNX_CHROMIUM_FLAGS.split(" ") : [])];
  const browser = await chromium.launchPersistentContext(profile, { executablePath, headless: true, args });
  const close = async () => {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { browser, close };
}
