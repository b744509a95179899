"""Proxy-made errors: 502 not found / port not open, 504, HTML for browsers, CORS."""

from __future__ import annotations

import asyncio
import time

import pytest

from support.backends import ThreadedBackend
from support.process import free_port
from support.raw_http import BROWSER_ACCEPT, BROWSER_UA, fetch, not_found_body, port_closed_body

pytestmark = pytest.mark.timeout(90)


def assert_json_error(r, expected: dict) -> None:
    assert r.status == expected["code"], r.body
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    assert r.headers.get("Access-Control-Allow-Origin") == "*"
    assert r.json() == expected


async def test_unknown_sandbox_is_502_json(shared_proxy):
    r = await fetch(shared_proxy, "/anything?x=1", host="3000-ghost.localhost")
    assert_json_error(r, not_found_body("ghost"))


async def test_unknown_sandbox_on_second_domain(shared_proxy):
    r = await fetch(shared_proxy, "/", host="8080-ghost2.sbx.example.test")
    assert_json_error(r, not_found_body("ghost2"))


async def test_unknown_sandbox_post_with_body(shared_proxy):
    r = await fetch(shared_proxy, "/upload", host="3000-ghost.localhost", method="POST",
                    data=b"x" * 100_000)
    assert_json_error(r, not_found_body("ghost"))


async def test_refused_port_is_502_port_not_open(shared_proxy):
    start = time.monotonic()
    r = await fetch(shared_proxy, "/", host="3000-refused.localhost")
    elapsed = time.monotonic() - start
    # the port in the body is the sandbox port from the URL, not the mapped backend port
    assert_json_error(r, port_closed_body("refused", 3000))
    # connect_attempts = 4 with backoff 0.1 s doubling: at least 0.1 + 0.2 + 0.4 s of retries
    assert elapsed >= 0.5, f"answered after {elapsed:.2f} s: the connect was not retried"
    assert elapsed < 10


async def test_refused_unmapped_port(shared_proxy):
    port = free_port()
    r = await fetch(shared_proxy, "/", host=f"{port}-demo.localhost")
    assert_json_error(r, port_closed_body("demo", port))


async def test_port_that_opens_during_connect_retries_is_reached(shared_proxy):
    port = free_port()
    late = ThreadedBackend(port=port, name="late")
    task = asyncio.ensure_future(fetch(shared_proxy, "/echo?late=1", host=f"{port}-demo.localhost"))
    try:
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, late.start)
        r = await asyncio.wait_for(task, 15)
    finally:
        late.stop()
    assert r.status == 200, r.body
    assert r.json()["backend"] == "late"
    assert r.json()["raw_path"] == "/echo?late=1"


async def test_backend_errors_are_passed_through_untouched(shared_proxy):
    for code in (404, 500, 502, 503, 504):
        r = await fetch(shared_proxy, f"/status/{code}", host="3000-demo.localhost",
                        headers={"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT})
        assert r.status == code
        assert r.body == f"backend says {code}\n".encode()
        assert r.headers["X-Status"] == str(code)
        assert r.headers["Content-Type"].startswith("text/plain")


JSON = "json"
HTML = "html"

NEGOTIATION = [
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT}, HTML, id="browser-navigation"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "navigate"},
                 HTML, id="browser-sec-fetch-navigate"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": "text/html"}, HTML, id="browser-accept-text-html"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "cors"},
                 JSON, id="fetch-cors"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "no-cors"},
                 JSON, id="fetch-no-cors"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "same-origin"},
                 JSON, id="fetch-same-origin"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "websocket"},
                 JSON, id="fetch-websocket"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT, "X-Requested-With": "XMLHttpRequest"},
                 JSON, id="xhr"),
    pytest.param({"User-Agent": "curl/8.5.0", "Accept": BROWSER_ACCEPT}, JSON, id="non-browser-ua"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": "application/json"}, JSON, id="browser-wants-json"),
    pytest.param({"User-Agent": BROWSER_UA, "Accept": "application/json, text/html;q=0.5"},
                 JSON, id="browser-prefers-json"),
    pytest.param({"User-Agent": "python-requests/2.32", "Accept": "*/*"}, JSON, id="sdk"),
]


def assert_html_error(r, status: int) -> None:
    assert r.status == status, r.body
    assert r.headers.get("Content-Type", "").startswith("text/html"), r.headers
    assert r.headers.get("Access-Control-Allow-Origin") == "*"
    assert b"<html" in r.body.lower()


@pytest.mark.parametrize("headers,kind", NEGOTIATION)
async def test_not_found_html_or_json(shared_proxy, headers, kind):
    r = await fetch(shared_proxy, "/", host="3000-ghost.localhost", headers=headers)
    if kind == HTML:
        assert_html_error(r, 502)
    else:
        assert_json_error(r, not_found_body("ghost"))


@pytest.mark.parametrize("headers,kind", [NEGOTIATION[0], NEGOTIATION[3]])
async def test_port_not_open_html_or_json(shared_proxy, headers, kind):
    r = await fetch(shared_proxy, "/", host="3000-refused.localhost", headers=headers)
    if kind == HTML:
        assert_html_error(r, 502)
    else:
        assert_json_error(r, port_closed_body("refused", 3000))


async def test_cors_preflight_style_request_to_unknown_sandbox(shared_proxy):
    # issue 13: a preflight the proxy must answer itself is a 204 the browser can act on
    r = await fetch(shared_proxy, "/", host="3000-ghost.localhost", method="OPTIONS",
                    headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert r.status == 204
    assert r.headers.get("Access-Control-Allow-Origin") == "*"


@pytest.fixture
def slow_proxy(proxy):
    return proxy(config={"timeouts": {"upstream_header": 1.0}})


async def test_backend_slow_to_answer_is_504_json(slow_proxy):
    start = time.monotonic()
    r = await fetch(slow_proxy, "/slow-head?delay=4", host="3000-demo.localhost")
    elapsed = time.monotonic() - start
    assert r.status == 504, r.body
    assert r.headers.get("Content-Type", "").startswith("application/json")
    assert r.headers.get("Access-Control-Allow-Origin") == "*"
    body = r.json()
    assert body["code"] == 504
    assert body["sandboxId"] == "demo"
    assert 0.8 <= elapsed < 3.5, f"504 after {elapsed:.2f} s with upstream_header = 1.0"


async def test_backend_slow_to_answer_is_504_html_for_browsers(slow_proxy):
    r = await fetch(slow_proxy, "/slow-head?delay=4", host="3000-demo.localhost",
                    headers={"User-Agent": BROWSER_UA, "Accept": BROWSER_ACCEPT})
    assert_html_error(r, 504)


async def test_response_started_within_upstream_header_is_not_cut(slow_proxy):
    r = await fetch(slow_proxy, "/slow-head?delay=0.3", host="3000-demo.localhost")
    assert r.status == 200
    assert r.body == b"slow done\n"
    # the limit is on the start of the response only: a body may take much longer
    start = time.monotonic()
    r = await fetch(slow_proxy, "/sse?n=5&interval=0.5", host="3000-demo.localhost")
    assert r.status == 200
    assert r.body.count(b"event: tick") == 5
    assert time.monotonic() - start >= 1.8


async def test_late_answer_after_504_never_reaches_a_later_request(slow_proxy):
    host = "3000-demo.localhost"
    r = await fetch(slow_proxy, "/slow-head?delay=1.5", host=host)
    assert r.status == 504
    # the backend answers "slow done" on the abandoned upstream connection at t=1.5 s;
    # requests before and after that moment must each get their own answer
    for i in range(6):
        r = await fetch(slow_proxy, f"/echo?after={i}", host=host)
        assert r.status == 200
        assert r.json()["raw_path"] == f"/echo?after={i}"
        await asyncio.sleep(0.2)
