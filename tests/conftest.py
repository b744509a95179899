"""pytest hooks and fixtures for the sandbox-proxy suite.

tests/unit holds tests of the pure parts (no sockets, no proxy process); tests/e2e holds the
end-to-end tests. These exercise the proxy as a black box: ``python -m proxy --config FILE`` in a
subprocess, configured through the TOML files documented in config/proxy.toml and
config/sandboxes.toml. Backends (tests/support/backends.py) run in this process on an event loop
of their own, so the proxy's memory can be measured on its own. The helpers live in
tests/support (``pythonpath = ["tests"]`` in pyproject.toml makes ``support`` importable);
this file keeps the hooks and the fixtures that every directory below sees.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from support.backends import ThreadedBackend
from support.process import ProxyProcess, free_port, launch_proxy, standard_registry
from support.raw_http import RawConn
from support.recording_backend import RecordingFleet

# --------------------------------------------------------------------------
# CI: a skipped test is a failed test when SANDBOX_PROXY_NO_SKIP=1
# --------------------------------------------------------------------------


def _no_skip() -> bool:
    return os.environ.get("SANDBOX_PROXY_NO_SKIP") == "1"


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if _no_skip() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"SANDBOX_PROXY_NO_SKIP=1: skipped test counts as a failure ({reason})"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if _no_skip() and report.skipped:
        reason = _skip_reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"SANDBOX_PROXY_NO_SKIP=1: skipped module counts as a failure ({reason})"
        )
    return report


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def backend():
    """The aiohttp test backend (tests/support/backends.py) on 127.0.0.1:<free port>."""
    b = ThreadedBackend(name="main").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fleet():
    """Recording backends (tests/support/recording_backend.py), one module's worth."""
    f = RecordingFleet()
    yield f
    f.stop()


@pytest.fixture(scope="session")
def refused_port():
    return free_port()


@pytest.fixture
def registry(backend, refused_port):
    return standard_registry(backend.port, refused_port)


@pytest.fixture
def proxy(tmp_path, backend, refused_port):
    """Factory: ``proxy(sandboxes=None, config=None, args=None)`` starts a proxy.

    Every proxy started is stopped (SIGTERM, then SIGKILL) at the end of the test.
    """
    started: list[ProxyProcess] = []

    def start(
        sandboxes: dict | None = None,
        config: dict | None = None,
        args: list[str] | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
        config_flag: bool = True,
    ) -> ProxyProcess:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        reg = standard_registry(backend.port, refused_port) if sandboxes is None else sandboxes
        p = launch_proxy(workdir, reg, config=config, args=args, wait=wait, env=env,
                         config_flag=config_flag)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory, backend, refused_port):
    """One proxy with the standard registry shared by a module's read-only tests."""
    workdir = tmp_path_factory.mktemp("shared-proxy")
    p = launch_proxy(workdir, standard_registry(backend.port, refused_port))
    yield p
    p.stop()


@pytest.fixture
async def raw_conns():
    """Factory opening RawConns that are all closed at the end of the test."""
    conns: list[RawConn] = []

    async def open_conn(port: int) -> RawConn:
        c = await RawConn.open(port)
        conns.append(c)
        return c

    yield open_conn
    for c in conns:
        await c.aclose()
