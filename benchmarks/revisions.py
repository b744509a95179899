"""Before/after check for request-path changes: CPU time per request of a git revision against
the working tree, measured side by side.

Throughput on a shared 2-core machine swings with whatever else runs; CPU seconds the proxy
process spends per request completed hardly does. Both proxies are pinned to core 0, wrk and an
nginx backend (13-byte answers, keep-alive) to core 1, rounds interleaved (A B A B ...):

    python -m benchmarks.revisions --base HEAD~1 [--rounds 3] [--duration 4]

prints the median microseconds of CPU per request of each and the ratio (> 1: the working tree
is cheaper). Needs nginx and wrk (`apt-get install nginx-light wrk`) and git.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def start_proxy(source: Path, work: Path, name: str, backend_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (work / f"{name}-reg.toml").write_text('[sandboxes.demo]\nhost = "127.0.0.1"\n'
                                           'mask_request_host = "localhost:${PORT}"\n')
    (work / f"{name}.toml").write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n[registry]\npath = "{name}-reg.toml"\n'
        f'[metrics]\nlisten = ""\n[upstream]\nallowed_networks = ["127.0.0.0/8"]\n'
        f'[log]\naccess = "off"\n')
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "proxy", "--config",
         str(work / f"{name}.toml"), "--log-level", "WARNING"],
        cwd=source, env={**os.environ, "PYTHONPATH": str(source)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4, help="seconds of wrk per run")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "git", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing")
    with tempfile.TemporaryDirectory(prefix="sandbox-proxy-revisions-") as tmp:
        work = Path(tmp)
        base_tree = work / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       cwd=ROOT, check=True)
        backend_port = free_port()
        (work / "nginx.conf").write_text(
            f"worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
            "events { worker_connections 4096; }\n"
            "http { access_log off; server { listen 127.0.0.1:%d; keepalive_requests 1000000;\n"
            "location / { return 200 \"Hello, World!\"; } } }\n" % backend_port)
        procs = []
        try:
            procs.append(subprocess.Popen(["taskset", "-c", "1", "nginx", "-c",
                                           str(work / "nginx.conf"), "-g", "daemon off;"]))
            wait_port(backend_port)
            proxies = {}
            for name, source in (("base", base_tree), ("working tree", ROOT)):
                proc, port = start_proxy(source, work, name.replace(" ", "-"), backend_port)
                procs.append(proc)
                proxies[name] = (proc, port)
            cost: dict[str, list[float]] = {name: [] for name in proxies}
            for _ in range(args.rounds):
                for name, (proc, port) in proxies.items():
                    before = cpu_seconds(proc.pid)
                    out = subprocess.run(
                        ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{args.duration}s", "-H",
                         f"Host: {backend_port}-demo.localhost", f"http://127.0.0.1:{port}/"],
                        capture_output=True, text=True, check=True).stdout
                    used = cpu_seconds(proc.pid) - before
                    requests = int(re.search(r"(\d+) requests in", out).group(1))
                    cost[name].append(used / requests * 1e6)
            base = statistics.median(cost["base"])
            for name, values in cost.items():
                median = statistics.median(values)
                print(f"{name:13s} {median:6.1f} us CPU/request  (runs: "
                      f"{', '.join(f'{v:.1f}' for v in values)})")
            print(f"ratio (base / working tree): {base / statistics.median(cost['working tree']):.3f}"
                  f"  [{args.base} vs working tree]")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
