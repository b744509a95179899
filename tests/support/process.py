"""The proxy as a subprocess, and what the end-to-end tests need around it.

Owns: starting ``python -m proxy --config FILE`` in a working directory of its own
(``launch_proxy``, ``wait_ready``, ``ProxyProcess``) and running the CLI to completion
(``run_cli``); the proxy.toml and sandboxes.toml it is given (``default_config``,
``standard_registry``, ``to_toml``, ``registry_toml``, ``deep_merge``); free and open ports;
what /proc says about a process tree (``rss_bytes``, ``listening_ports``, ``_children``); and
``wait_until``, the polling loop the tests wait on the proxy with.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
PROXY_START_TIMEOUT = 15.0
DOMAINS = ["localhost", "sbx.example.test"]


# --------------------------------------------------------------------------
# Ports, TOML, /proc
# --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            key = str(k)
            if not key.replace("_", "").replace("-", "").isalnum() or not key.isascii():
                key = json.dumps(key)
            parts.append(f"{key} = {_toml_value(v)}")
        return "{ " + ", ".join(parts) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write {table_name: {key: value}} as TOML (inline tables for dict values)."""
    out = []
    for name, keys in tables.items():
        out.append(f"[{name}]")
        for k, v in keys.items():
            out.append(f"{k} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


def registry_toml(sandboxes: dict[str, dict[str, Any]]) -> str:
    return to_toml({f"sandboxes.{sid}": spec for sid, spec in sandboxes.items()})


def deep_merge(base: dict, extra: dict | None) -> dict:
    result = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(result.get(k), dict):
            result[k] = deep_merge(result[k], v)
        else:
            result[k] = copy.deepcopy(v)
    return result


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces: the ppid is the 2nd field after ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process and all its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        todo.extend(_children(p))
    return total


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets held by ``pid`` and its descendants."""
    inodes: set[str] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        todo.extend(_children(p))
    return inodes


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state on sockets held by ``pid`` and its descendants."""
    inodes = socket_inodes(pid)
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> float:
    """Poll an async predicate until true; returns the time it took, fails on timeout."""
    start = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------
# The proxy subprocess
# --------------------------------------------------------------------------


class ProxyStartError(AssertionError):
    pass


@dataclass
class ProxyProcess:
    """A running ``python -m proxy`` and the files that configure it."""

    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    workdir: Path
    config_path: Path
    registry_path: Path
    stdout_path: Path
    stderr_path: Path
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    extra_listeners: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def host(self, sid: str = "demo", port: int = 3000, domain: str = "localhost") -> str:
        """The Host header that addresses ``port`` of sandbox ``sid``."""
        return f"{port}-{sid}.{domain}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def write_registry(self, sandboxes: dict[str, dict[str, Any]], atomic: bool = True) -> None:
        text = registry_toml(sandboxes)
        if atomic:
            tmp = self.registry_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.registry_path)
        else:
            with open(self.registry_path, "w") as f:
                f.write(text)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def default_config(port: int, metrics_port: int) -> dict[str, dict[str, Any]]:
    return {
        # drain_delay 0: stopping a proxy (SIGTERM) must not wait for a load balancer
        "server": {"listen": f"127.0.0.1:{port}", "domains": list(DOMAINS), "drain_delay": 0},
        "registry": {"kind": "static", "path": "sandboxes.toml", "reload_interval": 0.2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        # test backends live on loopback, which the proxy refuses unless allowed
        "upstream": {"allowed_networks": ["127.0.0.0/8", "::1/128"]},
    }


def launch_proxy(
    workdir: Path,
    sandboxes: dict[str, dict[str, Any]],
    config: dict | None = None,
    args: list[str] | None = None,
    raw_config: str | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
    config_flag: bool = True,
) -> ProxyProcess:
    """Write proxy.toml and sandboxes.toml under ``workdir/conf`` and start the CLI.

    The process runs with ``workdir`` as its current directory, not the config
    directory, so a registry path that is not resolved relative to the config
    file shows up as a start-up failure. ``env`` is added to the process's
    environment (SANDBOX_PROXY_LISTEN / _METRICS_LISTEN move the ports waited
    for); without ``config_flag`` no --config is passed (SANDBOX_PROXY_CONFIG
    in ``env`` names the file then).
    """
    conf_dir = workdir / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    metrics_port = free_port()
    cfg = deep_merge(default_config(port, metrics_port), config)
    listen = cfg["server"]["listen"]
    port = int(listen.rsplit(":", 1)[1])
    metrics_listen = cfg.get("metrics", {}).get("listen", "")
    metrics_port = int(metrics_listen.rsplit(":", 1)[1]) if metrics_listen else None
    env = dict(env or {})
    if env.get("SANDBOX_PROXY_LISTEN"):
        port = int(env["SANDBOX_PROXY_LISTEN"].rsplit(":", 1)[1])
    if env.get("SANDBOX_PROXY_METRICS_LISTEN"):
        metrics_port = int(env["SANDBOX_PROXY_METRICS_LISTEN"].rsplit(":", 1)[1])
    if args and "--listen" in args:
        port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])

    config_path = conf_dir / "proxy.toml"
    config_path.write_text(raw_config if raw_config is not None else to_toml(cfg))
    registry_path = conf_dir / "sandboxes.toml"
    registry_path.write_text(registry_toml(sandboxes))
    stdout_path = workdir / "proxy.stdout"
    stderr_path = workdir / "proxy.stderr"
    config_args = ["--config", str(config_path)] if config_flag else []
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *config_args, *(args or [])],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        )
    p = ProxyProcess(
        proc=proc,
        port=port,
        metrics_port=metrics_port,
        workdir=workdir,
        config_path=config_path,
        registry_path=registry_path,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        domains=list(cfg["server"].get("domains", DOMAINS)),
    )
    # every other listener the config asks for (e.g. a future [admin] listen) must accept too
    for name, table in cfg.items():
        if name in ("server", "metrics") or not isinstance(table, dict):
            continue
        listen_addr = table.get("listen")
        if isinstance(listen_addr, str) and listen_addr.rsplit(":", 1)[-1].isdigit():
            p.extra_listeners.append(int(listen_addr.rsplit(":", 1)[1]))
    if wait:
        try:
            wait_ready(p)
        except BaseException:
            p.stop(grace=2)
            raise
    return p


def wait_ready(p: ProxyProcess, timeout: float = PROXY_START_TIMEOUT) -> None:
    """Wait until the edge port accepts, /healthz and /readyz answer 200 (when the metrics
    listener is on) and any other configured listener accepts."""
    deadline = time.monotonic() + timeout
    edge_up = health_ok = ready_ok = False
    extra_up: set[int] = set()
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise ProxyStartError(
                f"proxy exited with status {p.proc.returncode} during start-up\n"
                f"--- stderr ---\n{p.stderr()}\n--- stdout ---\n{p.stdout()}"
            )
        if not edge_up:
            edge_up = port_is_open("127.0.0.1", p.port, timeout=0.2)
        if edge_up and not health_ok:
            health_ok = p.metrics_port is None or (
                _http_status(f"{p.metrics_url}/healthz", timeout=0.5) == 200
            )
        if health_ok and not ready_ok:
            ready_ok = p.metrics_port is None or (
                _http_status(f"{p.metrics_url}/readyz", timeout=0.5) == 200
            )
        for port in p.extra_listeners:
            if port not in extra_up and port_is_open("127.0.0.1", port, timeout=0.2):
                extra_up.add(port)
        if edge_up and health_ok and ready_ok and extra_up >= set(p.extra_listeners):
            return
        time.sleep(0.05)
    raise ProxyStartError(
        f"proxy not ready within {timeout} s (edge port {p.port} accepting: {edge_up}, "
        f"/healthz on {p.metrics_port} 200: {health_ok}, /readyz 200: {ready_ok}, "
        f"other listeners {p.extra_listeners} accepting: {sorted(extra_up)})\n"
        f"--- stderr ---\n{p.stderr()}\n--- stdout ---\n{p.stdout()}"
    )


def run_cli(args: list[str], timeout: float = 20.0, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m proxy ARGS`` to completion (for start-up failures); ``env`` is added
    to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


def standard_registry(backend_port: int, refused_port: int) -> dict[str, dict[str, Any]]:
    """demo: port 3000 -> backend; masked: the same with Host masking;
    refused: port 3000 -> a port nothing listens on."""
    return {
        "demo": {"host": "127.0.0.1", "ports": {3000: backend_port}},
        "masked": {
            "host": "127.0.0.1",
            "mask_request_host": "localhost:${PORT}",
            "ports": {3000: backend_port},
        },
        "refused": {"host": "127.0.0.1", "ports": {3000: refused_port}},
    }
