"""The issue's performance targets as pass/fail lines, and the ratios they are made of.

Each goal compares medians from the results. A goal whose inputs are missing (a peer could
not run, a scenario was skipped) is reported as "n/a", which never counts as a pass.
"""

from __future__ import annotations


def med(results: dict, scenario: str, target: str, key: str) -> float | None:
    try:
        return results["scenarios"][scenario]["targets"][target]["median"].get(key)
    except KeyError:
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(results: dict, ours: str = "ours") -> dict:
    """scenario -> target -> ours / target, on each scenario's headline number."""
    out: dict = {}
    for scenario, key in HEADLINE.items():
        targets = results["scenarios"].get(scenario, {}).get("targets", {})
        mine = med(results, scenario, ours, key)
        out[scenario] = {name: _ratio(mine, med(results, scenario, name, key))
                         for name in targets if name != ours}
    return out


HEADLINE = {"small": "rps", "download": "bytes_per_s", "upload": "bytes_per_s",
            "ws_echo": "round_trips_per_s", "ws_bulk": "bytes_per_s", "h2": "rps",
            "grpc_unary": "rps", "grpc_stream": "messages_per_s"}


def _line(scenario: str, goal: str, measured: float | None, op: str, needed: float,
          fmt: str) -> dict:
    if measured is None:
        verdict = "n/a"
    elif op == ">=":
        verdict = "pass" if measured >= needed else "FAIL"
    elif op == "<=":
        verdict = "pass" if measured <= needed else "FAIL"
    else:
        verdict = "pass" if measured < needed else "FAIL"
    return {"scenario": scenario, "goal": goal, "needed": f"{op} {fmt.format(needed)}",
            "measured": "n/a" if measured is None else fmt.format(measured), "result": verdict}


def evaluate(results: dict) -> list[dict]:
    def vs(scenario: str, other: str) -> float | None:
        key = HEADLINE[scenario]
        return _ratio(med(results, scenario, "ours", key), med(results, scenario, other, key))

    x = "{:.3f}x"
    lines = [
        _line("small", "small req/s vs nginx", vs("small", "nginx"), ">=", 0.40, x),
        _line("small", "small req/s vs Traefik", vs("small", "traefik"), ">=", 1.5, x),
        _line("small", "small p99 latency, ours / Traefik's",
              _ratio(med(results, "small", "ours", "p99_ms"),
                     med(results, "small", "traefik", "p99_ms")), "<=", 1.0, x),
        _line("download", "10 MB downloads vs Traefik", vs("download", "traefik"), ">=", 0.9, x),
        _line("upload", "10 MB uploads vs Traefik", vs("upload", "traefik"), ">=", 0.9, x),
        _line("ws_echo", "WebSocket echo vs bare relay", vs("ws_echo", "relay"), ">=", 0.8, x),
        _line("ws_bulk", "WebSocket bulk vs bare relay", vs("ws_bulk", "relay"), ">=", 0.8, x),
        _line("h2", "HTTP/2 small req/s vs nginx", vs("h2", "nginx"), ">=", 0.5, x),
        _line("h2", "HTTP/2 small req/s vs Traefik", vs("h2", "traefik"), ">=", 1.5, x),
        _line("grpc_unary", "gRPC unary calls/s vs Traefik", vs("grpc_unary", "traefik"), ">=",
              1.0, x),
    ]
    mem = results["scenarios"].get("memory", {}).get("targets", {}).get("ours", {})
    for kind, label in (("http_idle", "idle keep-alive connection"), ("ws_idle", "idle WebSocket")):
        lines.append(_line("memory", f"RSS per {label}",
                           (mem.get(kind) or {}).get("kib_per_conn"), "<=", 20.0, "{:.1f} KiB"))
    rt = results["scenarios"].get("routes", {})
    n = rt.get("n", 1_000_000)
    cost = rt.get("cost")
    lines.append(_line("routes", f"time to load {n:,} routes", rt.get("load_s"), "<", 10.0,
                       "{:.2f} s"))
    lines.append(_line("routes", f"small req/s cost of {n:,} routes",
                       None if cost is None else cost * 100, "<", 5.0, "{:.1f} %"))
    ran = set(results["scenarios"])
    return [line for line in lines if line["scenario"] in ran]
