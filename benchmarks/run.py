"""Entry point: `python -m benchmarks.run [--quick] [--duration S] [--rounds N] [--only a,b]`.

Owns the command line, the order of the run (install/find peers, start backends and targets,
run the scenarios, write the results) and the clean-up: every process the run started is
stopped when it ends, however it ends. See benchmarks/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import goals, procs, report, scenarios
from benchmarks.backends import start_backends, start_grpc_backend
from benchmarks.loadgen_h2 import h2load_path
from benchmarks.loadgen_http import wrk_path
from benchmarks.peers import ALL_PEERS, REFERENCES, Missing, apt_install, start_targets

SCENARIOS = ["small", "transfer", "ws", "memory", "routes", "h2", "grpc"]
QUICK_TARGETS = ["ours", "nginx", "traefik", "direct"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small requests only, ours vs nginx vs Traefik vs direct, ~1 minute")
    ap.add_argument("--duration", type=float, help="seconds per small-request run "
                    "(transfer and WebSocket runs take half; default 8, quick 5)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 3)")
    ap.add_argument("--only", help="comma-separated targets: " + ",".join(ALL_PEERS + REFERENCES))
    ap.add_argument("--scenarios", help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--idle-n", type=int, help="idle connections in the memory scenario "
                    "(default 10000, capped by the open-files limit)")
    ap.add_argument("--routes-n", type=int, help="sandboxes in the big registry (default 1000000)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for the machine to be idle (default 0)")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get, pip or npm")
    ap.add_argument("--out", type=Path, help="output directory (default benchmarks/results, "
                    "quick runs benchmarks/work/quick)")
    return ap.parse_args(argv)


def _csv(text: str | None, allowed: list[str], what: str) -> list[str] | None:
    if not text:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model or platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, " \
           f"Linux {platform.release()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.REPO_DIR,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_cleanup()
    nofile = procs.raise_nofile()
    procs.pin_self_to_load_cpu()
    procs.WORK_DIR.mkdir(parents=True, exist_ok=True)
    procs.clear_logs()
    logfile = open(procs.WORK_DIR / "run.log", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    s = scenarios.Settings()
    names = ALL_PEERS + REFERENCES
    chosen = SCENARIOS
    if args.quick:
        names, chosen = QUICK_TARGETS, ["small"]
        s.duration = 5.0
    if args.duration:
        s.duration = args.duration
        s.transfer_duration = max(2.0, args.duration / 2)
    s.rounds = args.rounds or s.rounds
    s.idle_n = args.idle_n or s.idle_n
    s.routes_n = args.routes_n or s.routes_n
    names = _csv(args.only, ALL_PEERS + REFERENCES, "target") or names
    chosen = _csv(args.scenarios, SCENARIOS, "scenario") or chosen
    idle_cap = max(100, (nofile - 2000) // 2)  # a proxy holds both sides of each WebSocket
    idle_n = min(s.idle_n, idle_cap)

    t_start = time.time()
    mode = "quick" if args.quick else "full"
    log(f"sandbox-proxy benchmarks ({mode}): targets {', '.join(names)}; "
        f"scenarios {', '.join(chosen)}; {s.rounds} rounds")
    if procs.ncpus() < 2:
        log("WARNING: fewer than 2 CPUs available: proxy and load generator share a core")
    run = scenarios.Run(s, log)
    run.retry_budget = 30.0 if args.quick else 180.0
    missing: list[Missing] = []
    install = not args.no_install
    h2_chosen = [x for x in chosen if x in ("h2", "grpc")]
    if install:
        apt_install(["wrk", "nginx"] + (["h2load", "nghttp"] if h2_chosen else [])
                    + (["node"] if "grpc" in chosen else []), log)
    if wrk_path() is None:
        missing.append(Missing("wrk", "wrk is not installed: every HTTP scenario is skipped"))
    if h2_chosen and h2load_path() is None:
        missing.append(Missing("h2load", "h2load (Debian package nghttp2-client) is not "
                               f"installed: scenarios {', '.join(h2_chosen)} are skipped"))
    if args.wait_idle > 0:
        wait_idle(args.wait_idle, log)
    log("starting backends and targets")
    try:
        backends = start_backends()
    except RuntimeError as e:
        log(f"cannot run any scenario: {e}")
        return 1
    if "grpc" in chosen:
        try:
            backends.grpc = start_grpc_backend()
        except RuntimeError as e:
            missing.append(Missing("grpc-backend", f"{e}: the gRPC scenario is skipped"))
    targets, failed = start_targets(names, install, log)
    missing += failed
    try:
        http_ok = wrk_path() is not None
        if "small" in chosen and http_ok:
            scenarios.small(run, targets)
        if "transfer" in chosen and http_ok:
            scenarios.transfer(run, targets)
        if "ws" in chosen:
            scenarios.websocket(run, targets)
        if "memory" in chosen:
            if idle_n < s.idle_n:
                log(f"note: idle connections capped at {idle_n:,} (open-files limit {nofile:,})")
            scenarios.memory(run, [t for t in targets if t.name != "direct"], idle_n)
        if "routes" in chosen and http_ok:
            scenarios.routes(run, log)
        if "h2" in chosen and h2load_path():
            scenarios.h2(run, targets)
        if "grpc" in chosen and h2load_path() and backends.grpc:
            scenarios.grpc(run, targets)
        if not backends.alive():
            run.incident("backend", "all", "a backend process exited during the run")
    except KeyboardInterrupt:
        log("interrupted: writing what was measured so far")
    finally:
        for t in targets:
            if t.name == "ours":
                scenarios.scan_log(run, t.name, t.proc)
        procs.stop_all()

    results = {
        "meta": {"date": time.strftime("%Y-%m-%d", time.localtime(t_start)), "mode": mode,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
                 "seconds": round(time.time() - t_start, 1), "machine": machine(),
                 "python": platform.python_version(), "commit": git_commit(),
                 "proxy_cpu": procs.PROXY_CPU, "load_cpu": procs.LOAD_CPU,
                 "nofile": nofile, "idle_n": idle_n, "settings": dataclasses.asdict(s),
                 "scenarios": chosen, "background_busy_cpus": run.background},
        "peers": [{"name": t.name, "kind": t.kind, "version": t.version, "notes": t.notes}
                  for t in targets],
        "missing": [dataclasses.asdict(m) for m in missing],
        "scenarios": run.scenarios,
        "incidents": run.incidents,
    }
    results["ratios"] = goals.ratios(results)
    results["goals"] = goals.evaluate(results)
    out_dir = args.out or (procs.WORK_DIR / "quick" if args.quick else procs.RESULTS_DIR)
    stem = results["meta"]["date"] + ("-" + time.strftime("%H%M%S") if args.quick else "")
    paths = report.write_all(results, out_dir, stem)
    summary(results, log)
    log("wrote " + ", ".join(str(p.relative_to(procs.REPO_DIR)) if p.is_relative_to(procs.REPO_DIR)
                             else str(p) for p in paths))
    return 0


def wait_idle(limit: float, log) -> None:
    deadline = time.monotonic() + limit
    busy = procs.busy_cpus(2.0)
    while busy > 0.15 and time.monotonic() < deadline:
        log(f"waiting for an idle machine: {busy:.2f} CPUs busy")
        time.sleep(10)
        busy = procs.busy_cpus(2.0)
    log(f"machine: {busy:.2f} CPUs busy with other work at the start")


def summary(results: dict, log) -> None:
    small = results["scenarios"].get("small", {}).get("targets", {})
    if small:
        log("\nsmall requests (medians):")
        for name, rec in small.items():
            md = rec["median"]
            r = results["ratios"]["small"].get(name)
            log(f"  {report.label(name):28s} {md.get('rps', 0) or 0:10,.0f} req/s  "
                f"p50 {md.get('p50_ms') or 0:6.2f} ms  p99 {md.get('p99_ms') or 0:6.2f} ms  "
                + ("" if name == "ours" else f"ours/this {r:.2f}" if r else "ours/this n/a"))
    if results["goals"]:
        log("\ntargets:")
        for g in results["goals"]:
            log(f"  {g['result']:4s}  {g['goal']}: {g['measured']} (needed {g['needed']})")
    for m in results["missing"]:
        log(f"MISSING {m['name']}: {m['reason'][:300]}")
    if results["incidents"]:
        log(f"{len(results['incidents'])} incidents (see the report)")


if __name__ == "__main__":
    sys.exit(main())
