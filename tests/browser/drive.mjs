// Runs one browser session for tests/support/chromium.py: a JSON script on stdin, a JSON report on
// stdout.
//
// Script: {"executable": "/usr/bin/chromium", "resolverRules": "...", "userDataDir": "...",
//          "artifacts": "dir for a failure screenshot", "timeout": ms per step,
//          "steps": [step, ...]}
// Steps (each waits on page state, never on the clock):
//   {"goto": url}                      navigate; reports the response status
//   {"text": "..."}                    wait until the text is visible on the page
//   {"click": selector}                click the first match (Playwright selector syntax)
//   {"fill": selector, "value": "..."} type into the first match
//   {"files": selector, "name", "mimeType", "base64"}   choose a file in an <input type=file>
//   {"textOf": selector}               wait for the selector; reports its innerText
//   {"waitForFunction": js}            wait until the expression is truthy; reports its value
//   {"evaluate": js}                   run the expression in the page; reports what it (or the
//                                      promise it returns) gives
// Report: {"ok": true, "results": [...]} or {"ok": false, "step": i, "error": "...",
//          "screenshot": path, "body": "visible text", "console": [...]}.
import { chromium } from 'playwright-core';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const script = JSON.parse(readFileSync(0, 'utf8'));
const timeout = script.timeout ?? 20000;
const userDataDir = script.userDataDir ?? mkdtempSync(join(tmpdir(), 'chromium-profile-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: script.executable ?? '/usr/bin/chromium',
  headless: true,
  timeout,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--host-resolver-rules=${script.resolverRules}`,
  ],
});
const page = context.pages()[0] ?? await context.newPage();
page.setDefaultTimeout(timeout);
const consoleLines = [];
page.on('console', (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
page.on('pageerror', (error) => consoleLines.push(`pageerror: ${error.message}`));

async function run(step) {
  if ('goto' in step) {
    const response = await page.goto(step.goto, { waitUntil: 'domcontentloaded' });
    return response ? response.status() : null;
  }
  if ('text' in step) {
    await page.getByText(step.text).first().waitFor({ state: 'visible' });
    return null;
  }
  if ('click' in step) {
    await page.locator(step.click).first().click();
    return null;
  }
  if ('fill' in step) {
    await page.locator(step.fill).first().fill(step.value);
    return null;
  }
  if ('files' in step) {
    await page.locator(step.files).first().setInputFiles({
      name: step.name, mimeType: step.mimeType, buffer: Buffer.from(step.base64, 'base64'),
    });
    return null;
  }
  if ('textOf' in step) {
    const locator = page.locator(step.textOf).first();
    await locator.waitFor({ state: 'attached' });
    return await locator.innerText();
  }
  if ('waitForFunction' in step) {
    const handle = await page.waitForFunction(step.waitForFunction);
    return await handle.jsonValue();
  }
  if ('evaluate' in step) {
    let timer;
    const expired = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`evaluate: no answer within ${timeout} ms`)),
                         timeout);
    });
    try {
      return await Promise.race([page.evaluate(step.evaluate), expired]);
    } finally {
      clearTimeout(timer);
    }
  }
  throw new Error(`unknown step ${JSON.stringify(step)}`);
}

const results = [];
let report;
for (const [index, step] of script.steps.entries()) {
  try {
    results.push(await run(step));
  } catch (error) {
    let screenshot = null;
    if (script.artifacts) {
      screenshot = join(script.artifacts, `failure-step-${index}.png`);
      await page.screenshot({ path: screenshot }).catch(() => { screenshot = null; });
    }
    const body = await page.evaluate(() => document.body?.innerText ?? '').catch(() => '');
    report = { ok: false, step: index, error: String(error?.message ?? error), screenshot,
               body: body.slice(0, 2000), console: consoleLines, results };
    break;
  }
}
report ??= { ok: true, results, console: consoleLines };
await context.close();
process.stdout.write(JSON.stringify(report) + '\n');
