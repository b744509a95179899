"""Headless Chromium for the browser tests: Debian's `chromium` driven by playwright-core (Node),
installed under tests/browser/ by `make test` and .ci/run.

`run_browser(steps, ...)` starts a fresh browser (its own empty profile) for one scripted session
(tests/browser/drive.mjs lists the steps) and returns each step's result. `*.<domain>` resolves to
127.0.0.1 and every other name to nothing, so the pages reach the proxy under test and nothing
else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

BROWSER_DIR = Path(__file__).resolve().parent.parent / "browser"
PAGES_DIR = BROWSER_DIR / "pages"
CHROMIUM = os.environ.get("SANDBOX_PROXY_CHROMIUM", "/usr/bin/chromium")


class BrowserStepFailed(AssertionError):
    pass


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (Debian package chromium; .ci/run installs it)"
    if shutil.which("node") is None:
        return "node not found (.ci/run installs nodejs and npm)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core not installed in tests/browser (make test runs npm ci there)"
    return None


def run_browser(steps: list[dict], *, domain: str, workdir: Path, step_timeout: float = 20.0,
                timeout: float = 90.0) -> list[Any]:
    """Run `steps` in a fresh headless Chromium; the list of step results.

    A failing step raises BrowserStepFailed with the error, the page's visible text, its console
    and a screenshot saved under `workdir`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    profile = workdir / "profile"
    script = {
        "executable": CHROMIUM,
        "resolverRules": f"MAP *.{domain} 127.0.0.1, MAP * ~NOTFOUND",
        "userDataDir": str(profile),
        "artifacts": str(workdir),
        "timeout": int(step_timeout * 1000),
        "steps": steps,
    }
    try:
        done = subprocess.run(["node", str(BROWSER_DIR / "drive.mjs")], input=json.dumps(script),
                              capture_output=True, text=True, timeout=timeout, cwd=BROWSER_DIR)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise BrowserStepFailed(f"the browser driver failed (status {done.returncode}):\n"
                                f"{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["ok"]:
        raise BrowserStepFailed(
            f"step {report['step']} {json.dumps(steps[report['step']])[:300]} failed: "
            f"{report['error']}\nscreenshot: {report['screenshot']}\n"
            f"--- page text ---\n{report['body']}\n--- console ---\n"
            + "\n".join(report["console"][-30:]))
    return report["results"]
