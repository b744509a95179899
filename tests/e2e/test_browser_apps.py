"""Real apps that check Origin against Host, in headless Chromium, through the real CLI with
`mask_request_host = "localhost:${PORT}"` on a domain other than localhost.

Streamlit refuses a WebSocket whose Origin does not match its Host, and Jupyter Server refuses a
cookie-authenticated kernel WebSocket the same way. With the Host masked, they work only because
the Origin follows the mask (proxy/origin.py); a page on another sandbox's origin that opens the
same WebSockets (with the user's cookies, as a cross-site WebSocket hijack would) must still be
refused by the app itself, which each test reads in the app's own log.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import urllib.parse
from dataclasses import dataclass

import pytest

from support import app_servers, chromium
from support.app_servers import AppProcess
from support.process import ProxyProcess, launch_proxy

pytestmark = pytest.mark.timeout(240)

DOMAIN = "example.test"
MASK = "localhost:${PORT}"
CLOSED = "document.getElementById('log')?.textContent.includes('close')"


@dataclass
class Stack:
    proxy: ProxyProcess
    streamlit: AppProcess
    jupyter: AppProcess
    pages: AppProcess
    token: str
    kernel: str

    def url(self, sandbox: str, port: int, path: str = "/") -> str:
        return f"http://{port}-{sandbox}.{DOMAIN}:{self.proxy.port}{path}"

    def ws(self, sandbox: str, port: int, path: str) -> str:
        return f"ws://{port}-{sandbox}.{DOMAIN}:{self.proxy.port}{path}"

    def cross_site_probe(self, target: str) -> str:
        """A page of another sandbox ("other", port 8000) that opens WebSocket `target`."""
        return self.url("other", 8000, "/ws_probe.html?ws=" + urllib.parse.quote(target, safe=""))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = chromium.missing()
    if reason:
        pytest.skip(reason)
    for module in ("streamlit", "jupyter_server", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} missing: pip install -e '.[apps]'")
    root = tmp_path_factory.mktemp("browser-apps")
    token = secrets.token_hex(16)
    apps = [app_servers.streamlit(root / "streamlit"),
            app_servers.jupyter_server(root / "jupyter", token),
            app_servers.static_pages(root / "pages")]
    proxy = None
    try:
        streamlit, jupyter, pages = apps
        for app, ready in ((streamlit, "/_stcore/health"), (jupyter, "/api/status"),
                           (pages, "/")):
            app_servers.wait_ready(app, ready)
        proxy = launch_proxy(root / "proxy", {
            "st": {"host": "127.0.0.1", "ports": {8501: streamlit.port},
                   "mask_request_host": MASK},
            "stkept": {"host": "127.0.0.1", "ports": {8501: streamlit.port},
                       "mask_request_host": MASK, "mask_origin": False},
            "jp": {"host": "127.0.0.1", "ports": {8888: jupyter.port},
                   "mask_request_host": MASK},
            "other": {"host": "127.0.0.1", "ports": {8000: pages.port}},
        }, config={"server": {"domains": [DOMAIN]}})
        yield Stack(proxy, streamlit, jupyter, pages, token,
                    app_servers.start_kernel(jupyter, token))
    finally:
        if proxy is not None:
            proxy.stop()
        for app in apps:
            app.stop()


def browse(stack: Stack, tmp_path, steps: list[dict]) -> list:
    return chromium.run_browser(steps, domain=DOMAIN, workdir=tmp_path / "browser")


def websocket_from_page(path: str) -> str:
    """JS: open a WebSocket to `path` on the page's own origin; "open" or "close <code>"."""
    return ("new Promise((resolve) => {"
            f" const s = new WebSocket(location.origin.replace(/^http/, 'ws') + '{path}');"
            " s.onopen = () => { s.close(); resolve('open'); };"
            " s.onclose = (e) => resolve('close ' + e.code); })")


# -- Streamlit ----------------------------------------------------------------------------------


def test_streamlit_button_and_upload_work_through_the_masked_url(stack, tmp_path):
    data = bytes(range(256)) * 40 + b"streamlit upload through the proxy\n"
    digest = hashlib.sha256(data).hexdigest()
    browse(stack, tmp_path, [
        {"goto": stack.url("st", 8501)},
        {"text": "Clicks: 0"},  # the page is rendered over the WebSocket: it is open
        {"click": "button:has-text('Add one')"},
        {"text": "Clicks: 1"},
        {"click": "button:has-text('Add one')"},
        {"text": "Clicks: 2"},
        {"files": "input[type=file]", "name": "sample.bin", "mimeType": "application/octet-stream",
         "base64": base64.b64encode(data).decode()},
        {"text": f"Received sample.bin: {len(data)} bytes, sha256 {digest}"},
    ])
    assert "Rejecting WebSocket" not in stack.streamlit.log()


def test_streamlit_refuses_its_own_page_when_origin_does_not_follow_the_mask(stack, tmp_path):
    # the bug, kept reachable with mask_origin = false: same page, same browser, refused
    results = browse(stack, tmp_path, [
        {"goto": stack.url("stkept", 8501)},
        {"evaluate": websocket_from_page("/_stcore/stream")},
    ])
    assert results[1].startswith("close"), results
    stack.streamlit.wait_for_log(f"origin=http://8501-stkept.{DOMAIN}:{stack.proxy.port}, "
                                 "host=localhost:8501")


def test_streamlit_refuses_a_cross_site_page(stack, tmp_path):
    results = browse(stack, tmp_path, [
        {"goto": stack.url("st", 8501)},
        {"text": "Clicks: 0"},  # the user has the app open (and its cookies)
        {"goto": stack.cross_site_probe(stack.ws("st", 8501, "/_stcore/stream"))},
        {"waitForFunction": CLOSED},
        {"textOf": "#log"},
    ])
    assert "open" not in results[-1].split(), results[-1]
    stack.streamlit.wait_for_log("Rejecting WebSocket connection with disallowed Origin or Host "
                                 f"header: origin=http://8000-other.{DOMAIN}:{stack.proxy.port}")


# -- Jupyter Server -----------------------------------------------------------------------------


def login_steps(stack: Stack, next_path: str) -> list[dict]:
    """Log in as a person does (the token in the login form: a cookie from then on)."""
    return [
        {"goto": stack.url("jp", 8888, "/login?next=" + urllib.parse.quote(next_path, safe=""))},
        {"fill": "#password_input", "value": stack.token},
        {"click": "#login_submit"},
    ]


def test_jupyter_kernel_websocket_from_a_page_it_serves(stack, tmp_path):
    code = urllib.parse.quote("print(6 * 7)")
    page = f"/static/ws_probe.html?kernel={stack.kernel}&code={code}"
    results = browse(stack, tmp_path, login_steps(stack, page) + [
        {"waitForFunction": "document.getElementById('log')?.textContent.includes('output')"},
        {"textOf": "#log"},
    ])
    assert results[-1].split("\n")[:2] == ["open", "output 42"], results[-1]
    assert "Blocking Cross Origin" not in stack.jupyter.log()


def test_jupyter_refuses_a_cross_site_page(stack, tmp_path):
    channel = stack.ws("jp", 8888, f"/api/kernels/{stack.kernel}/channels")
    results = browse(stack, tmp_path, login_steps(stack, "/api/status") + [
        {"text": "started"},  # logged in: /api/status answers with the login cookie
        {"goto": stack.cross_site_probe(channel)},
        {"waitForFunction": CLOSED},
        {"textOf": "#log"},
    ])
    assert "open" not in results[-1].split(), results[-1]
    # refused by Jupyter's Origin check (so the cookie did authenticate the attempt)
    stack.jupyter.wait_for_log("Blocking Cross Origin WebSocket Attempt.  Origin: "
                               f"http://8000-other.{DOMAIN}:{stack.proxy.port}")
