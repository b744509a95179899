"""A proxy's health around an attack on its HTTP/2 side (tests/e2e/test_http2_hostile.py,
tests/e2e/test_http2_fuzz.py): the baseline before, and the proxy back at it afterwards."""

from __future__ import annotations

from benchmarks.soak import HELD_GAUGES, ProcessSample, ProxyProbe
from support.h2_client import H2Client
from support.process import wait_until
from support.raw_http import fetch

MiB = 1 << 20
DEMO = "3000-demo.localhost"  # the sandbox every such proxy serves from its ordinary backend


async def normal_requests(p, authority: str = DEMO) -> None:
    """One HTTP/2 and one HTTP/1.1 request on fresh connections, both served."""
    async with await H2Client.open(p.port) as c:
        r = await c.request(authority, "/echo?healthy")
        assert r.status == 200 and r.ended, r.describe()
    assert (await fetch(p, "/echo?healthy-h1")).status == 200


async def baseline_of(p) -> tuple[ProxyProbe, ProcessSample]:
    await normal_requests(p)  # warm: imports, pooled backend connections
    probe = ProxyProbe(p.pid, p.metrics_url)

    async def no_clients() -> bool:  # no connection of an earlier test left
        gauges = await probe.gauges()
        return all(gauges.get(name, 0) == 0 for name in HELD_GAUGES)
    await wait_until(no_clients, timeout=10)
    return probe, await probe.sample()


async def assert_healthy(p, probe: ProxyProbe, baseline: ProcessSample, *,
                         rss_tolerance: int = 16 * MiB, within: float = 10) -> None:
    """Alive, serving both protocols, and back at `baseline` (held gauges, fds, RSS) within
    `within` seconds; no traceback logged."""
    assert p.alive(), p.stderr()[-2000:]
    await normal_requests(p)
    _, problems, took = await probe.settle(baseline, within, rss_tolerance=rss_tolerance)
    assert not problems, f"not back to the baseline after {took:.1f} s: {problems}"
    assert "Traceback" not in p.stderr(), p.stderr()[-3000:]
