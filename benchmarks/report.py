"""Turning a results dict into files: JSON, a Markdown report, and PNG charts (matplotlib, Agg).

Files for a run on date D, in the output directory (benchmarks/results/ for full runs):
  D.json, D.md                 the full results and the human-readable tables
  D-throughput.png             req/s, MB/s, round trips/s, gRPC calls/s and messages/s per
                               proxy (one panel per scenario)
  D-latency.png                small-request latency percentiles per proxy
  D-memory.png                 RSS per idle connection / WebSocket per proxy
and the same charts as latest-*.png, stable names for the README to embed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.goals import HEADLINE, med

LABELS = {"ours": "sandbox-proxy", "nginx": "nginx", "haproxy": "HAProxy", "caddy": "Caddy",
          "traefik": "Traefik", "chp": "configurable-http-proxy", "direct": "direct (no proxy)",
          "relay": "bare uvloop relay", "ours-1m": "sandbox-proxy, big registry",
          "ours-1": "sandbox-proxy, 1-sandbox registry"}
SCALE = {"rps": (1, "{:,.0f}"), "bytes_per_s": (1e6, "{:,.0f}"),
         "round_trips_per_s": (1, "{:,.0f}"), "messages_per_s": (1, "{:,.0f}")}
TITLES = {"small": "Small requests (req/s)", "download": "10 MB downloads (MB/s)",
          "upload": "10 MB uploads (MB/s)", "ws_echo": "WebSocket 1 KiB echo (round trips/s)",
          "ws_bulk": "WebSocket bulk one-way (MB/s)", "h2": "HTTP/2 small requests (req/s)",
          "grpc_unary": "gRPC unary (calls/s)", "grpc_stream": "gRPC server streaming (messages/s)"}
# Scenarios reported side by side: (first, second, section title, their column headings)
PAIRS = (("download", "upload", "10 MB transfers", "download MB/s", "upload MB/s"),
         ("ws_echo", "ws_bulk", "WebSocket", "1 KiB echo round trips/s", "bulk one-way MB/s"),
         ("grpc_unary", "grpc_stream", "gRPC", "unary calls/s", "streamed messages/s"))


def label(name: str) -> str:
    return LABELS.get(name, name)


def _cell(text: str, limit: int = 400) -> str:
    """Free text (log tails, errors) as one Markdown table/list line."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


def _fmt(v, spec: str = "{:,.2f}") -> str:
    return "n/a" if v is None else spec.format(v)


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def markdown(results: dict) -> str:
    m = results["meta"]
    s = results["scenarios"]
    out = [f"# sandbox-proxy benchmarks, {m['date']} ({m['mode']} run)", "",
           f"{m['machine']}. Proxy under test pinned to CPU {m['proxy_cpu']}, wrk, the harness's "
           f"WebSocket client and the backends to CPU {m['load_cpu']}. Every proxy uses one "
           f"core (nginx 1 worker, HAProxy nbthread 1, Caddy/Traefik GOMAXPROCS=1, "
           f"sandbox-proxy workers=1, Node single-threaded). Figures are medians of "
           f"{m['settings']['rounds']} interleaved rounds; ratios are sandbox-proxy / that row.",
           ""]
    if results.get("goals"):
        out += ["## Targets", "", "| goal | needed | measured | result |", "|---|---|---|---|"]
        out += [f"| {g['goal']} | {g['needed']} | {g['measured']} | **{g['result']}** |"
                for g in results["goals"]]
        out.append("")
    if "small" in s:
        sm = s["small"]
        out += ["## Small requests", "",
                f"13-byte body, keep-alive, `wrk -t1 -c{sm['connections']}`, "
                f"{sm['duration_s']:g} s per run. Proxy CPU: cores' worth of CPU time the "
                "proxy's processes used during the run (1.00 = its core was saturated).", "",
                "| proxy | req/s | ours / this | p50 ms | p75 ms | p90 ms | p99 ms | errors "
                "| proxy CPU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, rec in sm["targets"].items():
            md = rec["median"]
            errs = sum(r.get("non_2xx", 0) + r.get("socket_errors", 0) for r in rec["rounds"])
            out.append(f"| {label(name)} | {_fmt(md.get('rps'), '{:,.0f}')} | "
                       f"{_ratio_cell(results, 'small', name)} | "
                       + " | ".join(_fmt(md.get(f"p{p}_ms")) for p in (50, 75, 90, 99))
                       + f" | {errs} | {_fmt(md.get('proxy_cpu'))} |")
        out.append("")
    if "h2" in s:
        out += _h2_section(results)
    for a, b, title, ha, hb in PAIRS:
        if a in s or b in s:
            out += _pair_section(results, a, b, title, ha, hb)
    if "memory" in s:
        mem = s["memory"]
        out += ["## Memory", "", f"RSS growth of the proxy's processes with {mem['n']:,} idle "
                "client connections held open through it, divided by the connections opened.", "",
                "| proxy | KiB per idle keep-alive conn | KiB per idle WebSocket "
                "| RSS before (MiB) | opened (http / ws) |", "|---|---:|---:|---:|---:|"]
        for name, rec in mem["targets"].items():
            h, w = rec.get("http_idle") or {}, rec.get("ws_idle") or {}
            out.append(f"| {label(name)} | {_fmt(h.get('kib_per_conn'))} | "
                       f"{_fmt(w.get('kib_per_conn'))} | "
                       f"{_fmt((h.get('rss_before_kib') or 0) / 1024, '{:,.1f}')} | "
                       f"{h.get('opened', 0):,} / {w.get('opened', 0):,} |")
        out.append("")
    if "routes" in s:
        rt = s["routes"]
        t = rt.get("targets", {})
        rps1 = (t.get("ours-1") or {}).get("median", {}).get("rps")
        rpsn = (t.get("ours-1m") or {}).get("median", {}).get("rps")
        out += ["## Routes", "", f"Static registry of {rt['n']:,} sandboxes "
                f"({rt['file_bytes'] / 1e6:,.0f} MB of TOML) against the 1-sandbox registry: two "
                "fresh instances, metrics listener off in both, measured interleaved.", "",
                "| | 1 sandbox | " + f"{rt['n']:,} sandboxes |", "|---|---:|---:|",
                f"| start until first 200 (s) | {_fmt(rt.get('load_s_1'))} "
                f"| {_fmt(rt.get('load_s'))} |",
                f"| RSS (MiB) | {_fmt((rt.get('rss_kib_1') or 0) / 1024, '{:,.1f}')} | "
                f"{_fmt((rt.get('rss_kib') or 0) / 1024, '{:,.1f}')} |",
                f"| small req/s | {_fmt(rps1, '{:,.0f}')} | {_fmt(rpsn, '{:,.0f}')} |", ""]
        if rt.get("error"):
            out += [f"Could not run: {_cell(rt['error'])}", ""]
    out += ["## Peers", "", "| name | version | notes |", "|---|---|---|"]
    for p in results["peers"]:
        notes = _cell("; ".join(p["notes"]))
        out.append(f"| {label(p['name'])} | {_cell(p['version'])} | {notes} |")
    for p in results["missing"]:
        out.append(f"| {label(p['name'])} | **MISSING** | {_cell(p['reason'])} |")
    out.append("")
    if results["incidents"]:
        out += ["## Incidents", ""]
        out += [f"- {label(i['target'])} / {i['scenario']}: {_cell(i['what'], 600)}"
                for i in results["incidents"]]
        out.append("")
    return "\n".join(out)


def _names(*recs: dict) -> list[str]:
    """Every target of these scenario records, measured or left out by the check, in order."""
    return list(dict.fromkeys(n for rec in recs for part in ("targets", "checks")
                              for n in rec.get(part, {})))


def _errors(rec: dict | None) -> int:
    return sum(r.get("failed", 0) + r.get("non_2xx", 0) for r in (rec or {}).get("rounds", []))


def _h2_section(results: dict) -> list[str]:
    h2 = results["scenarios"]["h2"]
    out = ["## HTTP/2 small requests", "",
           f"13-byte body over cleartext HTTP/2 with prior knowledge (h2c), "
           f"`h2load -c{h2['clients']} -m{h2['streams']}` ({h2['clients'] * h2['streams']} "
           f"streams in flight), {h2['duration_s']:g} s per run; HTTP/1.1 from the proxy to the "
           "backend, Host rewritten. Check: the Host the backend saw, fetched over h2c.", "",
           "| proxy | req/s | ours / this | mean ms | errors | proxy CPU | check |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for name in _names(h2):
        rec = h2["targets"].get(name)
        md = (rec or {}).get("median", {})
        out.append(f"| {label(name)} | {_fmt(md.get('rps'), '{:,.0f}')} | "
                   f"{_ratio_cell(results, 'h2', name)} | {_fmt(md.get('mean_ms'))} | "
                   f"{_errors(rec)} | {_fmt(md.get('proxy_cpu'))} | "
                   f"{_cell(h2['checks'].get(name, ''), 200)} |")
    out.append("")
    return out


def _pair_section(results: dict, a: str, b: str, title: str, ha: str, hb: str) -> list[str]:
    s = results["scenarios"]
    recs = [s.get(a, {}), s.get(b, {})]
    checks = {**recs[0].get("checks", {}), **recs[1].get("checks", {})}
    out = [f"## {title}", ""]
    if a == "grpc_unary":
        un, st = recs
        out += [f"h2c end to end. Unary: `h2load -c{un['clients']} -m{un['streams']}` POSTing "
                "one 13-byte message, 13-byte reply, "
                f"{un['duration_s']:g} s per run. Server streaming: {st['streams']} h2load "
                f"connections, one call at a time each, every call a stream of "
                f"{st['messages_per_call']:,} messages of {st['message_bytes']} bytes, "
                f"{st['duration_s']:g} s per run. Check: a real grpcio client through the "
                "target (reply bytes, stream length, grpc-status 0, :authority seen).", ""]
    heads = f"| proxy | {ha} | ours / this | {hb} | ours / this |" + (" check |" if checks else "")
    out += [heads, "|---|---:|---:|---:|---:|" + ("---|" if checks else "")]
    for name in _names(*recs):
        cells = []
        for sc in (a, b):
            key = HEADLINE[sc]
            div, spec = SCALE[key]
            v = med(results, sc, name, key)
            cells += [_fmt(None if v is None else v / div, spec), _ratio_cell(results, sc, name)]
        if checks:
            cells.append(_cell(checks.get(name, ""), 200))
        out.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _ratio_cell(results: dict, scenario: str, name: str) -> str:
    if name == "ours":
        return "1.00"
    r = results.get("ratios", {}).get(scenario, {}).get(name)
    return "n/a" if r is None else f"{r:.2f}"


# -- charts -----------------------------------------------------------------------------------

def _bars(ax, names, values, title, ylabel):
    colors = ["#d62728" if n == "ours" else ("#7f7f7f" if n in ("direct", "relay") else "#1f77b4")
              for n in names]
    ax.bar(range(len(names)), [v or 0 for v in values], color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([label(n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _thousands(ax)


def _thousands(ax) -> None:
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def charts(results: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["scenarios"]
    written: list[Path] = []
    panels = [sc for sc in HEADLINE if sc in s]
    if panels:
        cols = min(3, len(panels))
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.2 * rows), squeeze=False)
        for ax, sc in zip(axes.flat, panels):
            key = HEADLINE[sc]
            names = list(s[sc]["targets"])
            div = SCALE[key][0]
            vals = [(med(results, sc, n, key) or 0) / div for n in names]
            unit = TITLES[sc].split("(")[1].rstrip(")")
            _bars(ax, names, vals, TITLES[sc], unit)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle("Throughput, one core per proxy (red: sandbox-proxy, grey: references)")
        fig.tight_layout()
        written.append(_save(fig, out_dir, stem, "throughput"))
        plt.close(fig)
    if "small" in s:
        names = list(s["small"]["targets"])
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.2
        for i, p in enumerate((50, 75, 90, 99)):
            vals = [med(results, "small", n, f"p{p}_ms") or 0 for n in names]
            ax.bar([x + (i - 1.5) * width for x in range(len(names))], vals, width, label=f"p{p}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([label(n) for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("latency (ms)")
        ax.set_title("Small-request latency percentiles, wrk -t1 -c50 (lower is better)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir, stem, "latency"))
        plt.close(fig)
    if "memory" in s and s["memory"]["targets"]:
        mem = s["memory"]["targets"]
        names = list(mem)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, (kind, lab) in enumerate((("http_idle", "idle keep-alive connection"),
                                         ("ws_idle", "idle WebSocket"))):
            vals = [(mem[n].get(kind) or {}).get("kib_per_conn") or 0 for n in names]
            ax.bar([x + (i - 0.5) * 0.38 for x in range(len(names))], vals, 0.38, label=lab)
        ax.axhline(20, color="#d62728", linestyle="--", linewidth=1, label="target: 20 KiB")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([label(n) for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("KiB RSS per connection")
        ax.set_title(f"Proxy RSS per idle connection ({s['memory']['n']:,} held open)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir, stem, "memory"))
        plt.close(fig)
    return written


def _save(fig, out_dir: Path, stem: str, kind: str) -> Path:
    path = out_dir / f"{stem}-{kind}.png"
    fig.savefig(path, dpi=110)
    shutil.copyfile(path, out_dir / f"latest-{kind}.png")
    return path


def write_all(results: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_json(results, paths[0])
    paths[1].write_text(markdown(results))
    try:
        paths += charts(results, out_dir, stem)
    except ImportError as e:
        results["incidents"].append({"target": "harness", "scenario": "report",
                                     "what": f"no charts: matplotlib missing ({e})"})
        write_json(results, paths[0])
        paths[1].write_text(markdown(results))
    return paths
