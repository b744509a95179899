"""Server: runs one proxy process (edge listener, metrics listener, registry, drain on SIGTERM)
and, with `server.workers > 1`, supervises that many worker processes sharing the port through
SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from aiohttp import web

from proxy.config import ListenAddress, ProxyConfig
from proxy.context import EdgeContext
from proxy.edge import ClientConnection
from proxy.metrics import metrics_app
from proxy.registry import Registry, open_registry
from proxy.timeouts import DeadlineSweeper
from proxy.upstream import UpstreamPools

log = logging.getLogger("sandbox_proxy")

DRAIN_TIMEOUT = 30.0  # seconds in-flight requests get after SIGTERM


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


async def serve(config: ProxyConfig, registry: Registry, *, reuse_port: bool = False,
                metrics: bool = True) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    loop = asyncio.get_running_loop()
    t = config.timeouts
    sweeper = DeadlineSweeper(loop, min(t.client_header, t.upstream_header, t.client_idle,
                                        t.upstream_idle))
    pools = UpstreamPools(config, loop, sweeper)
    registry.add_removal_listener(pools.close_sandboxes)
    ctx = EdgeContext(loop=loop, config=config, registry=registry, pools=pools,
                      sweeper=sweeper)
    sock = listening_socket(config.server.listen, config.server.backlog, reuse_port)
    server = await loop.create_server(lambda: ClientConnection(ctx), sock=sock,
                                      backlog=config.server.backlog)
    runner = None
    if metrics and config.metrics.listen is not None:
        runner = web.AppRunner(metrics_app(lambda: not ctx.draining, ctx), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.metrics.listen.host, config.metrics.listen.port,
                           reuse_port=reuse_port)
        await site.start()
    await registry.start()
    sweeper.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("sandbox-proxy listening on %s for %s (pid %d)", config.server.listen,
             ", ".join(sorted(config.server.domains)), os.getpid())
    await stop.wait()

    log.info("draining %d connections", len(ctx.connections))
    ctx.draining = True
    server.close()
    for conn in list(ctx.connections):
        conn.drain()
    deadline = loop.time() + DRAIN_TIMEOUT
    while ctx.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(ctx.connections):
        conn.transport.abort()
    pools.close_idle()
    sweeper.stop()
    await registry.close()
    if runner is not None:
        await runner.cleanup()
    log.info("stopped")


def run_worker(config: ProxyConfig, registry: Registry, reuse_port: bool, metrics: bool) -> None:
    install_event_loop_policy()
    asyncio.run(serve(config, registry, reuse_port=reuse_port, metrics=metrics))


def run(config: ProxyConfig) -> int:
    """Run the proxy; returns the process exit status."""
    registry = open_registry(config)  # validated before any fork: a bad file exits 2 once
    workers = config.server.workers
    if workers <= 1:
        run_worker(config, registry, reuse_port=False, metrics=True)
        return 0
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # worker: only the first serves the metrics listener
            code = 0
            try:
                run_worker(config, registry, reuse_port=True, metrics=index == 0)
            except BaseException:
                log.exception("worker crashed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)

    def forward(signum, _frame):
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    sys.stdout.flush()
    return 0 if status < 0 else status
