"""Real web apps for the browser tests (tests/e2e/test_browser_apps.py): Streamlit, Jupyter Server
with an IPython kernel, and a plain static server standing for another sandbox's pages.

Each runs as its own process group on 127.0.0.1 with HOME and its config directories inside the
test's temporary directory. Outbound HTTP an app might try (Streamlit looks up its "external IP"
when it meets an unknown Origin) goes to a closed port on loopback through HTTP(S)_PROXY, so
nothing leaves the machine and nothing waits on a network that is not there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from support.chromium import PAGES_DIR
from support.process import free_port

APPS_DIR = Path(__file__).resolve().parent.parent / "apps"
START_TIMEOUT = 60.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class AppProcess:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the app has logged `text`; the log."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {text!r}:\n{log[-4000:]}")
            time.sleep(0.05)
        return log

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own group: it and its kernels
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left


def _environment(home: Path) -> dict[str, str]:
    closed = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", HTTP_PROXY=closed, HTTPS_PROXY=closed,
               http_proxy=closed, https_proxy=closed, NO_PROXY="", no_proxy="",
               JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
               JUPYTER_DATA_DIR=str(home / "jupyter-data"),
               JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"),
               IPYTHONDIR=str(home / "ipython"), JUPYTER_PLATFORM_DIRS="1")
    return env


def start_app(name: str, args: list[str], port: int, workdir: Path) -> AppProcess:
    """Start `args` (its log in workdir/<name>.log); the caller waits with `wait_ready`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=_environment(workdir),
                                start_new_session=True)
    return AppProcess(name, proc, port, log_path)


def wait_ready(app: AppProcess, path: str, timeout: float = START_TIMEOUT) -> None:
    """Wait until the app answers HTTP on `path` (any status)."""
    deadline = time.monotonic() + timeout
    while True:
        if app.proc.poll() is not None:
            raise AssertionError(f"{app.name} exited with {app.proc.returncode}:\n"
                                 f"{app.log()[-4000:]}")
        try:
            with _DIRECT.open(f"http://127.0.0.1:{app.port}{path}", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{app.name} not answering within {timeout} s:\n"
                                 f"{app.log()[-4000:]}")
        time.sleep(0.1)


def streamlit(workdir: Path) -> AppProcess:
    port = free_port()
    return start_app("streamlit", [
        sys.executable, "-m", "streamlit", "run", str(APPS_DIR / "streamlit_app.py"),
        "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--browser.serverAddress", "localhost",
        "--server.fileWatcherType", "none", "--global.developmentMode", "false",
    ], port, workdir)


def jupyter_server(workdir: Path, token: str) -> AppProcess:
    """Jupyter Server with its defaults (Host and Origin checks on), serving PAGES_DIR under
    /static/ beside its own files."""
    port = free_port()
    return start_app("jupyter", [
        sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
        "--ServerApp.terminals_enabled=False", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={workdir}", f"--ServerApp.extra_static_paths={PAGES_DIR}",
    ], port, workdir)


def start_kernel(app: AppProcess, token: str) -> str:
    """Start a python3 kernel through Jupyter's REST API; its id."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{app.port}/api/kernels", method="POST",
        data=json.dumps({"name": "python3"}).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=30) as response:
        return json.load(response)["id"]


def static_pages(workdir: Path) -> AppProcess:
    """tests/browser/pages over plain HTTP: another sandbox's site."""
    port = free_port()
    return start_app("pages", [sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1", "--directory", str(PAGES_DIR)], port, workdir)
