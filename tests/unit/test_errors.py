"""Error responses: exact JSON shapes users rely on, HTML for browser navigations, CORS."""

import json

import pytest

from proxy import errors


def split(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def test_not_found_json():
    status, headers, body = split(errors.render_error(
        errors.SandboxNotFound("abc"), html_page=False, head_only=False, close=False))
    assert status == "HTTP/1.1 502 Bad Gateway"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"sandboxId": "abc", "message": "The sandbox was not found",
                                "code": 502}
    assert int(headers["Content-Length"]) == len(body)


def test_port_not_open_json_and_html():
    error = errors.PortNotOpen("abc", 3000)
    _, _, body = split(errors.render_error(error, html_page=False, head_only=False, close=False))
    assert json.loads(body) == {"sandboxId": "abc",
                                "message": "The sandbox is running but port is not open",
                                "port": 3000, "code": 502}
    status, headers, body = split(errors.render_error(error, html_page=True, head_only=False,
                                                      close=True))
    assert status.startswith("HTTP/1.1 502")
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Connection"] == "close"
    assert b"port is not open" in body and b"<code>3000</code>" in body


def test_head_only_keeps_length_without_body():
    full = errors.render_error(errors.SandboxNotFound("x"), html_page=False, head_only=False,
                               close=False)
    head = errors.render_error(errors.SandboxNotFound("x"), html_page=False, head_only=True,
                               close=False)
    assert full.startswith(head) and head.endswith(b"\r\n\r\n") and len(full) > len(head)


def test_bad_host_is_plain_text_even_for_browsers():
    _, headers, body = split(errors.render_error(errors.BadHost("Invalid host: x"),
                                                 html_page=True, head_only=False, close=False))
    assert headers["Content-Type"].startswith("text/plain") and body == b"Invalid host: x\n"


CHROME = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130 Safari/537.36"
NAV = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize("ua, accept, mode, xrw, expected", [
    (CHROME, NAV, b"navigate", None, True),
    (CHROME, NAV, None, None, True),
    (CHROME, b"*/*", b"cors", None, False),
    (CHROME, NAV, b"cors", None, False),
    (CHROME, NAV, b"websocket", None, False),
    (CHROME, NAV, b"navigate", b"XMLHttpRequest", False),
    (b"curl/8.0", NAV, None, None, False),
    (CHROME, b"application/json", None, None, False),
    (CHROME, b"application/json, text/html;q=0.5", None, None, False),
    (None, NAV, None, None, False),
])
def test_browser_navigation_detection(ua, accept, mode, xrw, expected):
    assert errors.wants_html(ua, accept, mode, xrw) is expected
