"""The short soak that CI runs: `python -m benchmarks.soak --duration 15` (benchmarks/soak.md).

Fifteen seconds of the mixed workload (HTTP, uploads, downloads, SSE, WebSocket, the proxy's own
error answers, backends dying mid-response, clients vanishing, garbage) through the real CLI,
then the proxy must be back to its baseline: connection gauges and open fds exactly, RSS within
10 MiB. `make soak` runs the same for longer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.process import REPO_ROOT

pytestmark = pytest.mark.timeout(180)


def test_short_soak_returns_to_baseline(tmp_path):
    report = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "15", "--concurrency", "24",
         "--json", str(report), "--workdir", str(tmp_path / "work")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    print(run.stdout)
    assert report.exists(), f"the soak did not finish:\n{run.stdout}\n{run.stderr[-3000:]}"
    result = json.loads(report.read_text())
    assert result["exchanges"] > 1000, result["runs"]
    assert all(result["runs"].get(name, 0) > 0 for name in result["runs"]), result["runs"]
    assert result["failed"] == 0, "\n".join(result["examples"])
    assert result["leaks"] == [], "\n".join(result["leaks"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
