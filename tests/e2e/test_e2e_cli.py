"""The command line: start-up validation (exit 2), --listen, health endpoints, console
script, and the public docs' example (python -m http.server behind the proxy, curl)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.process import (default_config, free_port, launch_proxy, listening_ports, port_is_open,
                             registry_toml, run_cli, to_toml)
from support.raw_http import fetch, not_found_body

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl") or "/usr/bin/curl"


def write_files(tmp_path: Path, config_text: str | None = None, registry_text: str | None = None):
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    cfg = conf / "proxy.toml"
    cfg.write_text(config_text if config_text is not None
                   else to_toml(default_config(free_port(), free_port())))
    reg = conf / "sandboxes.toml"
    if registry_text is not None:
        reg.write_text(registry_text)
    else:
        reg.write_text(registry_toml({"demo": {"host": "127.0.0.1"}}))
    return cfg, reg


def run_expecting_exit(cfg: Path, cwd: Path, args: list[str] | None = None) -> subprocess.CompletedProcess:
    try:
        return run_cli(["--config", str(cfg), *(args or [])], timeout=15, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail("the proxy started (or hung) instead of exiting on a bad file")


def valid_config_with(section: str, line: str) -> str:
    base = default_config(free_port(), free_port())
    text = to_toml(base)
    # replace or add one key of a section with a raw TOML line
    key = line.split("=", 1)[0].strip()
    lines = text.splitlines()
    out, in_section, done = [], False, False
    for l in lines:
        if l.startswith("["):
            if in_section and not done:
                out.append(line)
                done = True
            in_section = l == f"[{section}]"
        if in_section and l.split("=", 1)[0].strip() == key:
            out.append(line)
            done = True
            continue
        out.append(l)
    if not done:
        if in_section:
            out.append(line)
        else:
            out += [f"[{section}]", line]
    return "\n".join(out) + "\n"


BAD_CONFIGS = [
    pytest.param("server", "listen = 12", "listen", id="listen-not-string"),
    pytest.param("server", 'listen = "127.0.0.1"', "listen", id="listen-without-port"),
    pytest.param("server", 'listen = "127.0.0.1:99999"', "listen", id="listen-port-range"),
    pytest.param("server", 'domains = "localhost"', "domains", id="domains-not-list"),
    pytest.param("server", 'trusted_proxies = ["not-a-cidr"]', "trusted_proxies", id="bad-cidr"),
    pytest.param("timeouts", 'connect = "soon"', "connect", id="timeout-not-number"),
    pytest.param("timeouts", "upstream_header = -1.0", "upstream_header", id="negative-timeout"),
    pytest.param("upstream", "connect_attempts = -1", "connect_attempts", id="negative-attempts"),
    pytest.param("upstream", 'mask_origin = "yes"', "mask_origin", id="mask-origin-not-bool"),
    pytest.param("limits", 'max_header_bytes = "big"', "max_header_bytes", id="limit-not-int"),
    pytest.param("registry", "reload_interval = \"often\"", "reload_interval", id="reload-not-number"),
]


@pytest.mark.parametrize("section,line,key", BAD_CONFIGS)
def test_bad_config_value_exits_2_naming_file_and_key(tmp_path, section, line, key):
    cfg, _ = write_files(tmp_path, config_text=valid_config_with(section, line))
    res = run_expecting_exit(cfg, tmp_path)
    out = res.stderr + res.stdout
    assert res.returncode == 2, out
    assert "proxy.toml" in out, out
    assert key in out, out
    assert "Traceback" not in out, out


def test_config_syntax_error_exits_2(tmp_path):
    cfg, _ = write_files(tmp_path, config_text="[server\nlisten = \n")
    res = run_expecting_exit(cfg, tmp_path)
    assert res.returncode == 2, res.stderr
    assert "proxy.toml" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_missing_config_file_exits_2(tmp_path):
    res = run_expecting_exit(tmp_path / "nope.toml", tmp_path)
    assert res.returncode == 2, res.stderr
    assert "nope.toml" in res.stderr + res.stdout


BAD_REGISTRIES = [
    pytest.param('[sandboxes.Bad_Id]\nhost = "127.0.0.1"\n', "Bad_Id", id="bad-id"),
    pytest.param('[sandboxes.demo]\nports = { 3000 = 8080 }\n', "host", id="missing-host"),
    pytest.param('[sandboxes.demo]\nhost = 42\n', "host", id="host-not-string"),
    pytest.param('[sandboxes.demo]\nhost = "127.0.0.1"\nports = { 3000 = "abc" }\n', "ports",
                 id="port-not-int"),
    pytest.param('[sandboxes.demo]\nhost = "127.0.0.1"\nports = { 70000 = 80 }\n', "ports",
                 id="port-out-of-range"),
    pytest.param('[sandboxes.demo]\nhost = "127.0.0.1"\nmask_request_host = 5\n',
                 "mask_request_host", id="mask-not-string"),
    pytest.param('[sandboxes.demo]\nhost = "127.0.0.1"\nmask_origin = "no"\n',
                 "mask_origin", id="mask-origin-not-bool"),
    pytest.param('[sandboxes.demo\nhost = "127.0.0.1"\n', None, id="syntax-error"),
]


@pytest.mark.parametrize("text,key", BAD_REGISTRIES)
def test_bad_registry_exits_2_naming_file_and_key(tmp_path, text, key):
    cfg, _ = write_files(tmp_path, registry_text=text)
    res = run_expecting_exit(cfg, tmp_path)
    out = res.stderr + res.stdout
    assert res.returncode == 2, out
    assert "sandboxes.toml" in out, out
    if key:
        assert key in out, out
    assert "Traceback" not in out, out


def test_missing_registry_file_exits_2(tmp_path):
    cfg, reg = write_files(tmp_path)
    reg.unlink()
    res = run_expecting_exit(cfg, tmp_path)
    assert res.returncode == 2, res.stderr
    assert "sandboxes.toml" in res.stderr + res.stdout


def test_help_exits_0():
    res = run_cli(["--help"], timeout=15)
    assert res.returncode == 0, res.stderr
    assert "--config" in res.stdout
    assert "--listen" in res.stdout


def test_console_script_is_the_same_cli(tmp_path):
    script = Path(sys.executable).parent / "sandbox-proxy"
    assert script.exists(), f"console script not installed at {script}"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=15)
    assert res.returncode == 0 and "--config" in res.stdout
    cfg, _ = write_files(tmp_path, registry_text='[sandboxes.Bad_Id]\nhost = "127.0.0.1"\n')
    res = subprocess.run([str(script), "--config", str(cfg)], capture_output=True, text=True,
                         timeout=15, cwd=tmp_path)
    assert res.returncode == 2
    assert "Bad_Id" in res.stderr + res.stdout


async def test_listen_flag_overrides_config(proxy):
    override = free_port()
    p = proxy(args=["--listen", f"127.0.0.1:{override}"])
    assert p.port == override
    configured = int(p.config_path.read_text().split('listen = "127.0.0.1:', 1)[1].split('"')[0])
    assert configured != override
    assert not port_is_open("127.0.0.1", configured)
    r = await fetch(p, "/echo", host="3000-demo.localhost")
    assert r.status == 200


async def test_health_and_ready_endpoints(shared_proxy):
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(shared_proxy.metrics_url + path, timeout=5) as resp:
            assert resp.status == 200


async def test_metrics_listener_can_be_disabled(tmp_path, backend):
    p = launch_proxy(tmp_path, {"demo": {"host": "127.0.0.1", "ports": {3000: backend.port}}},
                     config={"metrics": {"listen": ""}})
    try:
        r = await fetch(p, "/echo", host="3000-demo.localhost")
        assert r.status == 200
        assert listening_ports(p.pid) == {p.port}
    finally:
        p.stop()


async def test_listens_on_edge_and_metrics_ports_only(shared_proxy):
    assert listening_ports(shared_proxy.pid) == {shared_proxy.port, shared_proxy.metrics_port}


def test_registry_path_is_relative_to_config_file(tmp_path, backend):
    # launch_proxy runs the proxy from tmp_path while the files are in tmp_path/conf
    p = launch_proxy(tmp_path, {"demo": {"host": "127.0.0.1", "ports": {3000: backend.port}}})
    try:
        assert p.alive()
    finally:
        p.stop()


# ---------------------------------------------------------------------------
# The docs' example: python -m http.server behind the proxy
# ---------------------------------------------------------------------------

DOC_SANDBOX = "ip3nfrvajtqu5ktoxugc7"


@pytest.fixture
def http_server(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for name in (".bash_logout", ".bashrc", ".profile"):
        (home / name).write_text(f"# {name}\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(home)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_is_open("127.0.0.1", port):
            assert proc.poll() is None, "http.server exited"
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def docs_proxy(proxy, http_server):
    return proxy(
        sandboxes={DOC_SANDBOX: {"host": "127.0.0.1", "ports": {3000: http_server}}},
        config={"server": {"domains": ["localhost", "e2b.app"]}},
    )


def direct_listing(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return resp.read()


DOC_LINES = [
    b"<title>Directory listing for /</title>",
    b"<h1>Directory listing for /</h1>",
    b'<li><a href=".bash_logout">.bash_logout</a></li>',
    b'<li><a href=".bashrc">.bashrc</a></li>',
    b'<li><a href=".profile">.profile</a></li>',
]


async def test_docs_example_directory_listing(docs_proxy, http_server):
    host = f"3000-{DOC_SANDBOX}.e2b.app"
    r = await fetch(docs_proxy, "/", host=host)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/html")
    for line in DOC_LINES:
        assert line in r.body
    assert r.body == direct_listing(http_server)
    f = await fetch(docs_proxy, "/.bashrc", host=host)
    assert f.status == 200 and f.body == b"# .bashrc\n"
    missing = await fetch(docs_proxy, "/missing.txt", host=host)
    assert missing.status == 404  # http.server's own 404, passed through


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "-sS", "--noproxy", "*", "--max-time", "10", *args],
                          capture_output=True, timeout=20)


async def test_docs_example_with_curl(docs_proxy, http_server, tmp_path):
    host = f"3000-{DOC_SANDBOX}.e2b.app"
    url = f"http://{host}/"
    connect_to = f"{host}:80:127.0.0.1:{docs_proxy.port}"
    body_file = tmp_path / "body.html"
    res = curl("--connect-to", connect_to, "-o", str(body_file), "-w", "%{http_code}", url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"200"
    assert body_file.read_bytes() == direct_listing(http_server)
    # the same through curl's own Host handling with a port in the URL
    res = curl("--connect-to", f"{host}:{docs_proxy.port}:127.0.0.1:{docs_proxy.port}",
               f"http://{host}:{docs_proxy.port}/")
    assert res.returncode == 0, res.stderr
    for line in DOC_LINES:
        assert line in res.stdout
    # an unknown sandbox, as an SDK sees it
    res = curl("--connect-to", f"3000-gone.e2b.app:80:127.0.0.1:{docs_proxy.port}",
               "-w", "\n%{http_code}", "http://3000-gone.e2b.app/")
    body, _, code = res.stdout.rpartition(b"\n")
    assert code == b"502"
    assert json.loads(body) == not_found_body("gone")
