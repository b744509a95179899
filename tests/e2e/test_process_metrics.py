"""Process metrics through the real CLI: what /metrics says about the proxy's processes is what
/proc says of them (one process, and a supervisor with its workers), the README's leak criterion
read from /metrics alone, and the access log's dropped lines counted when stdout blocks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from support.process import (ProxyProcess, _children, default_config, free_port, registry_toml,
                             standard_registry, to_toml, wait_ready, wait_until)
from support.raw_http import fetch, metric_value

pytestmark = pytest.mark.timeout(90)

P = "sandbox_proxy_process_"


async def process_metrics(p) -> dict[str, float]:
    names = ("resident_memory_bytes", "open_fds", "max_fds", "cpu_seconds_total",
             "start_time_seconds")
    return {name: await metric_value(p, P + name) for name in names}


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def proc_fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        return next(int(line.split()[3]) for line in f if line.startswith("Max open files"))


def proc_start_time(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    ticks = int(stat[stat.rfind(")") + 2:].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


async def test_process_metrics_are_what_proc_says(proxy):
    started = time.time()
    p = proxy()
    m = await process_metrics(p)
    assert abs(m["open_fds"] - proc_fds(p.pid)) <= 2  # the scrape's own socket comes and goes
    assert abs(m["resident_memory_bytes"] - proc_rss(p.pid)) < 4 << 20
    assert m["max_fds"] == proc_fd_limit(p.pid)
    assert abs(m["start_time_seconds"] - proc_start_time(p.pid)) < 0.05
    assert started - 1 <= m["start_time_seconds"] <= time.time()
    cpu_before = m["cpu_seconds_total"]
    assert cpu_before > 0
    for _ in range(400):
        assert (await fetch(p, "/echo")).status == 200
    assert await metric_value(p, P + "cpu_seconds_total") > cpu_before


async def test_leak_criterion_from_the_metrics_alone(proxy):
    """The README's criterion, as an operator's graph sees it: 200 idle client connections (and
    the backend connections their requests pooled) move the fds up and back; the fds no
    connection holds do not move."""
    p = proxy()

    async def unexplained() -> float:
        return (await metric_value(p, P + "open_fds")
                - await metric_value(p, "sandbox_proxy_client_connections")
                - await metric_value(p, "sandbox_proxy_upstream_connections"))

    assert (await fetch(p, "/echo")).status == 200
    baseline_fds, baseline_unexplained = await metric_value(p, P + "open_fds"), await unexplained()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(n: int) -> None:
            async with session.get(p.url(f"/echo?n={n}"), headers={"Host": p.host()}) as r:
                assert r.status == 200
                await r.read()
        await asyncio.gather(*(one(n) for n in range(200)))
        assert await metric_value(p, P + "open_fds") >= baseline_fds + 200
        assert abs(await unexplained() - baseline_unexplained) <= 2
    # the clients are gone; the pooled backend connections stay, and are accounted for

    async def back() -> bool:
        return await metric_value(p, "sandbox_proxy_client_connections") == 0
    await wait_until(back, 5)
    assert abs(await unexplained() - baseline_unexplained) <= 2
    idle = await metric_value(p, "sandbox_proxy_upstream_connections")
    assert await metric_value(p, P + "open_fds") <= baseline_fds + idle + 2


async def test_workers_and_supervisor_are_added_up(proxy):
    p = proxy(config={"server": {"workers": 2}})
    await wait_until(lambda: _has_two_children(p.pid), 10)
    pids = [p.pid, *_children(p.pid)]
    await asyncio.sleep(1.2)  # a fresh snapshot from each worker
    m = await process_metrics(p)
    assert m["max_fds"] == sum(proc_fd_limit(pid) for pid in pids)
    assert abs(m["open_fds"] - sum(proc_fds(pid) for pid in pids)) <= 4
    assert abs(m["resident_memory_bytes"] - sum(proc_rss(pid) for pid in pids)) < 12 << 20
    assert abs(m["start_time_seconds"] - max(proc_start_time(pid) for pid in pids)) < 0.05
    assert m["cpu_seconds_total"] > 0


async def _has_two_children(pid: int) -> bool:
    return len(_children(pid)) == 2


async def test_access_log_lines_dropped_when_stdout_blocks(tmp_path, backend, refused_port):
    """stdout is a pipe nobody reads: once the writer is 200 batches behind, lines are dropped
    and counted, and the proxy keeps serving."""
    conf = tmp_path / "conf"
    conf.mkdir()
    config = default_config(free_port(), free_port())
    (conf / "proxy.toml").write_text(to_toml(config))
    (conf / "sandboxes.toml").write_text(registry_toml(standard_registry(backend.port,
                                                                         refused_port)))
    stderr_path = tmp_path / "proxy.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(conf / "proxy.toml")],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    p = ProxyProcess(proc=proc, port=int(config["server"]["listen"].rsplit(":", 1)[1]),
                     metrics_port=int(config["metrics"]["listen"].rsplit(":", 1)[1]),
                     workdir=tmp_path, config_path=conf / "proxy.toml",
                     registry_path=conf / "sandboxes.toml", stdout_path=tmp_path / "unused",
                     stderr_path=stderr_path)
    try:
        wait_ready(p)
        assert await metric_value(p, "sandbox_proxy_access_log_dropped_lines_total") == 0

        async def dropping() -> bool:
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    async with session.get(p.url("/echo"), headers={"Host": p.host()}) as r:
                        assert r.status == 200
            return await metric_value(p, "sandbox_proxy_access_log_dropped_lines_total") > 0
        await wait_until(dropping, 40, interval=0.01)  # 200 batches of 50 ms: over 10 s
        assert (await fetch(p, "/echo")).status == 200
    finally:
        proc.stdout.close()  # the blocked writer gets EPIPE and the process can exit
        code = p.stop(grace=10)
    assert code == 0, p.stderr()
