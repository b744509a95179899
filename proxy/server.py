"""Server: the lifecycle of the proxy's processes.

One process (`server.workers = 1`) runs everything: the edge listener, the metrics listener, the
registry. With more workers, a supervisor forks that many processes sharing the edge port through
SO_REUSEPORT; each writes a Stats snapshot every second and the supervisor serves /metrics as
their sum, plus /healthz and /readyz. Signals:
- /readyz: 200 once the registry has answered (loaded its file, or reached its store) once, until
  the drain; a store that becomes unreachable later does not change it (requests that need the
  store get 503 "registry unavailable" and sandbox_proxy_registry_ready says so), unless
  `[metrics] ready_requires_registry` asks for that too.
- SIGTERM/SIGINT: /readyz turns 503 at once; the edge keeps serving for `drain_delay` (so the load
  balancer notices), then stops accepting; in-flight requests finish; streams get until
  `drain_timeout`, then are closed; exit 0.
- SIGHUP: re-read the config and apply what can change safely (timeouts, limits, access, routing,
  domains, trusted proxies, log level), re-read the registry file and the TLS certificate; keys
  that need a restart are reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from proxy import diagnostic_log
from proxy.accesslog import AccessLog
from proxy.activity import ActivityReporter
from proxy.admin import start_admin
from proxy.config import ConfigError, ListenAddress, ProxyConfig, reload_config
from proxy.context import EdgeContext
from proxy.listener import EdgeListener
from proxy.metrics import metrics_app
from proxy.pools import UpstreamPools
from proxy.registry import (
    Registry,
    counts_reloads,
    counts_resumes,
    counts_store_lookups,
    open_registry,
)
from proxy.stats import Snapshot, Stats, merge, process_usage
from proxy.timeouts import DeadlineSweeper
from proxy.tls import CertificateStore

log = logging.getLogger("sandbox_proxy")

SNAPSHOT_SECONDS = 1.0
LOADED_POLL_SECONDS = 0.05  # until the registry's first answer
# What SIGHUP cannot change (sockets, processes, the registry and admin listener, the log
# writer): a change to any of these is reported and takes effect after a restart.
RESTART_KEYS = (("server", "listen"), ("server", "workers"), ("server", "backlog"),
                ("server", "proxy_protocol"), ("server", "http2"), ("server", "tls"),
                ("registry", None), ("metrics", None), ("admin", None), ("log", "access"),
                ("activity", None))


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep working without it
        log.warning("uvloop is not available; using the default asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def listening_socket(address: ListenAddress, backlog: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(sockaddr)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def start_metrics(config: ProxyConfig, snapshot: Callable[[], Snapshot],
                        ready: Callable[[], bool]) -> web.AppRunner | None:
    if config.metrics.listen is None:
        return None
    runner = web.AppRunner(metrics_app(snapshot, ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.metrics.listen.host, config.metrics.listen.port).start()
    return runner


class Worker:
    """One serving process."""

    def __init__(self, config: ProxyConfig, registry: Registry, *, reuse_port: bool,
                 snapshot_path: Path | None, serves_admin: bool = True):
        self.config = config
        self.registry = registry
        self.reuse_port = reuse_port
        self.serves_admin = serves_admin
        self.snapshot_path = snapshot_path  # None: serve metrics here instead
        self.stop = asyncio.Event()
        self.interrupted = False  # SIGINT: someone at a terminal, no load balancer to wait for
        self.loaded = False  # the registry has answered once: this instance can take traffic
        self.certificates = (CertificateStore(config.server.tls, config.server.http2)
                             if config.server.tls is not None else None)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        t = config.timeouts
        sweeper = DeadlineSweeper(loop, min(t.client_header, t.upstream_header, t.client_idle,
                                            t.upstream_idle))
        stats = Stats(getattr(self.registry, "kind", "static"))
        pools = UpstreamPools(config, loop, sweeper, stats)
        self.registry.add_removal_listener(pools.close_sandboxes)
        access_log = AccessLog(config.log.access, loop)
        ctx = self.ctx = EdgeContext(loop=loop, config=config, registry=self.registry,
                                     pools=pools, sweeper=sweeper, stats=stats,
                                     access_log=access_log,
                                     scheme=b"https" if self.certificates else b"http")
        sock = listening_socket(config.server.listen, config.server.backlog, self.reuse_port)
        listener = EdgeListener(ctx, sock, self.certificates.context if self.certificates else None,
                                config.server.proxy_protocol)
        await listener.start()
        metrics = None
        if self.snapshot_path is None:
            metrics = await start_metrics(config, self.snapshot, self.ready)
        await self.registry.start()
        admin = await start_admin(config, self.registry) if self.serves_admin else None
        sweeper.start()
        background = [loop.create_task(self._every(SNAPSHOT_SECONDS, self.write_snapshot))
                      if self.snapshot_path else None,
                      loop.create_task(self._wait_until_loaded())]
        activity = None
        if config.activity.url is not None or config.activity.redis:
            activity = ActivityReporter(ctx, config.activity, self.registry)
            background.append(loop.create_task(activity.run()))
        certificates = self.certificates  # holds config.server.tls
        if certificates is not None and certificates.config.reload_interval > 0:
            background.append(loop.create_task(
                self._every(certificates.config.reload_interval, self.reload_certificates)))
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("sandbox-proxy %s on %s for %s (pid %d)",
                 "https" if self.certificates else "http", config.server.listen,
                 ", ".join(sorted(config.server.domains)), os.getpid())
        await self.stop.wait()
        await self.drain(listener, self.config.server.drain_delay if not self.interrupted else 0.0)
        for task in background:
            if task is not None:
                task.cancel()
        if activity is not None:  # what the last interval saw, once, briefly
            try:
                async with asyncio.timeout(2):
                    await activity.report_once()
            except TimeoutError:
                pass
            if activity.session is not None:
                await activity.session.close()
        pools.close_idle()
        sweeper.stop()
        await self.registry.close()
        access_log.close()
        if self.snapshot_path:
            self.write_snapshot()
        for runner in (metrics, admin):
            if runner is not None:
                await runner.cleanup()
        log.info("stopped")

    def ready(self) -> bool:
        """/readyz: this instance can take traffic."""
        if self.ctx.draining:
            return False
        if self.config.metrics.ready_requires_registry:
            return self.registry.ready()
        return self.loaded

    async def _wait_until_loaded(self) -> None:
        while not self.registry.ready():
            await asyncio.sleep(LOADED_POLL_SECONDS)
        self.loaded = True

    def interrupt(self) -> None:
        self.interrupted = True
        self.stop.set()

    async def drain(self, listener: EdgeListener, delay: float) -> None:
        ctx = self.ctx
        server = self.config.server
        ctx.draining = True  # /readyz 503 now; responses say Connection: close
        log.info("draining: still serving for %.1fs", delay)
        await asyncio.sleep(delay)
        listener.close()
        for conn in list(ctx.connections):
            conn.drain()
        log.info("stopped accepting; waiting up to %.1fs for %d connections",
                 server.drain_timeout, len(ctx.connections))
        deadline = ctx.loop.time() + server.drain_timeout
        while ctx.connections and ctx.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(ctx.connections):
            conn.transport.close()
        await asyncio.sleep(0)  # let connection_lost callbacks account for the last exchanges

    def snapshot(self) -> Snapshot:
        gauges = self.ctx.gauges()
        gauges["workers"] = 1
        gauges["ready"] = int(self.ready())  # summed: the supervisor's /readyz (not exported)
        snap = self.ctx.stats.snapshot(gauges)
        snap["process"] = process_usage()
        snap["access_log_dropped"] = self.ctx.access_log.dropped
        registry = self.registry  # a file-backed registry counts its own reloads
        if counts_reloads(registry):
            snap["reloads"] += [["registry", "ok", registry.reloads_ok],
                                ["registry", "error", registry.reloads_failed]]
            if registry.last_reload_ok:
                snap["last_reload_success"]["registry"] = registry.last_reload_ok
        # A remote registry counts the look-ups that went to its store (cache misses); the edge
        # counted those answered from memory. Each look-up is counted once.
        if counts_store_lookups(registry) and registry.lookup_outcomes:
            counted = {(k, o): n for k, o, n in snap["lookups"]}
            for outcome, n in registry.lookup_outcomes.items():
                key = (registry.kind, outcome)
                counted[key] = counted.get(key, 0) + n
            snap["lookups"] = [[*k, n] for k, n in counted.items()]
            snap["lookup_duration"] = registry.lookup_duration.snapshot()
        if counts_resumes(registry):
            snap["resumes"] = dict(registry.resumes)
            snap["resume_duration"] = registry.resume_duration.snapshot()
        return snap

    def write_snapshot(self) -> None:
        path = self.snapshot_path
        if path is None:  # this process serves its own metrics: no supervisor reads a file
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)

    async def _every(self, seconds: float, action: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                action()
            except Exception:  # keep the loop alive: the next tick tries again
                log.exception("periodic task failed")

    def reload_certificates(self) -> None:
        if self.certificates is None:  # no [server.tls]
            return
        changed = self.certificates.reload_if_changed()
        if changed is not None:
            self.ctx.stats.reloaded("certificate", changed, time.time())

    def reload(self) -> None:
        """SIGHUP."""
        stats = self.ctx.stats
        source = self.config.source
        try:
            new = reload_config(self.config)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            stats.reloaded("config", False, time.time())
            return
        for section, key in RESTART_KEYS:
            before, after = getattr(self.config, section), getattr(new, section)
            if key is not None:
                before, after = getattr(before, key), getattr(after, key)
            if before != after:
                log.warning("config reload: [%s]%s changed; it takes effect after a restart",
                            section, f" {key}" if key else "")
        applied = _keep_restart_keys(new, self.config)
        self.config = applied
        self.ctx.apply(applied)
        self.ctx.pools.apply(applied)
        diagnostic_log.apply(applied.log)
        stats.reloaded("config", True, time.time())
        reload_registry = getattr(self.registry, "reload", None)
        if reload_registry is not None:
            reload_registry()
        if self.certificates:
            self.reload_certificates()
        log.info("config reloaded from %s", source)


def _keep_restart_keys(new: ProxyConfig, old: ProxyConfig) -> ProxyConfig:
    from dataclasses import replace
    server = replace(new.server, listen=old.server.listen, workers=old.server.workers,
                     backlog=old.server.backlog, proxy_protocol=old.server.proxy_protocol,
                     http2=old.server.http2, tls=old.server.tls)
    return replace(new, server=server, registry=old.registry, metrics=old.metrics,
                   admin=old.admin, log=replace(new.log, access=old.log.access))


def run_worker(config: ProxyConfig, registry: Registry, reuse_port: bool,
               snapshot_path: Path | None, serves_admin: bool = True) -> None:
    install_event_loop_policy()
    worker = Worker(config, registry, reuse_port=reuse_port, snapshot_path=snapshot_path,
                    serves_admin=serves_admin)
    asyncio.run(worker.serve())


class Supervisor:
    """Forks the workers, serves the metrics listener over their snapshots, forwards signals."""

    def __init__(self, config: ProxyConfig, registry: Registry):
        self.config = config
        self.registry = registry
        self.stats_dir = Path(tempfile.mkdtemp(prefix="sandbox-proxy-stats-"))
        self.children: dict[int, Path] = {}
        self.indexes: dict[int, int] = {}
        self.draining = False
        self.restarts = 0

    def fork_workers(self) -> None:
        for index in range(self.config.server.workers):
            self.fork_worker(index)

    def fork_worker(self, index: int) -> None:
        path = self.stats_dir / f"worker-{index}.json"
        path.unlink(missing_ok=True)  # a dead predecessor's numbers leave the sums
        pid = os.fork()
        if pid == 0:
            # A replacement is forked from the supervisor's running loop: forget that loop
            # (asyncio keeps it per thread) so the worker can run its own.
            asyncio.events._set_running_loop(None)
            code = 0
            try:  # the first worker serves the admin API
                run_worker(self.config, self.registry, True, path, serves_admin=index == 0)
            except BaseException:
                log.exception("worker crashed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = path
        self.indexes[pid] = index

    def snapshot(self) -> Snapshot:
        snapshots = []
        for path in self.children.values():
            try:
                snapshots.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        if not snapshots:
            return {}
        merged = merge([*snapshots, {"process": process_usage()}])  # the supervisor counts too
        merged["gauges"]["draining"] = int(self.draining)
        return merged

    def ready(self) -> bool:
        """Every worker says it is ready (Worker.ready), and no drain has begun."""
        snap = self.snapshot()
        return (not self.draining and bool(snap)
                and snap["gauges"].get("ready", 0) >= len(self.children))

    def reload_log_settings(self) -> None:
        """SIGHUP: the supervisor's own log lines follow [log] too (the workers report problems
        with the file)."""
        try:
            diagnostic_log.apply(reload_config(self.config).log)
        except ConfigError:
            pass

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        metrics = await start_metrics(self.config, self.snapshot, self.ready)

        def forward(signum: int) -> None:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.draining = True
            elif signum == signal.SIGHUP:
                self.reload_log_settings()
            for pid in self.children:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, forward, signum)
        status = 0
        while self.children:
            for pid in list(self.children):
                done, code = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
                path = self.children.pop(pid)
                index = self.indexes.pop(pid)
                exit_code = os.waitstatus_to_exitcode(code)
                if self.draining:
                    status = status or max(exit_code, 0)
                    continue
                # A worker died on its own: replace it (its port share and its metrics).
                log.error("worker %d exited with %d; starting a new one", pid, exit_code)
                path.unlink(missing_ok=True)
                self.restarts += 1
                await asyncio.sleep(min(5.0, 0.1 * self.restarts))  # no tight crash loop
                if not self.draining:
                    self.fork_worker(index)
            await asyncio.sleep(0.1)
        if metrics is not None:
            await metrics.cleanup()
        for path in self.stats_dir.iterdir():
            path.unlink()
        self.stats_dir.rmdir()
        return status


def run(config: ProxyConfig) -> int:
    """Run the proxy; returns the process exit status."""
    diagnostic_log.apply(config.log)
    registry = open_registry(config)  # validated before any fork: a bad file exits 2 once
    if (config.admin.listen is not None and config.server.workers > 1
            and getattr(registry, "kind", "") == "static"):
        raise ConfigError(f"{config.source}: [admin] listen: the static registry keeps admin "
                          "writes in one process's memory; with [server] workers > 1 use a "
                          "shared registry (redis) or workers = 1")
    if config.server.tls is not None:
        CertificateStore(config.server.tls)  # likewise for the certificate
    if config.server.workers <= 1:
        run_worker(config, registry, reuse_port=False, snapshot_path=None)
        return 0
    supervisor = Supervisor(config, registry)
    supervisor.fork_workers()
    install_event_loop_policy()
    return asyncio.run(supervisor.run())
