"""`sandbox-proxy share`: mint a share link from the command line.

    sandbox-proxy share --config PATH --sandbox ID --port N --ttl SECONDS [--scheme https]
                        [--domain DOMAIN]

prints the URL (`<scheme>://<port>-<id>.<domain>/?share=<token>`). The record is read from the
configured registry for its `share_epoch`; the signing key is `[access] share_key` (or the
SANDBOX_PROXY_SHARE_KEY environment variable). Exit 2: configuration or arguments unusable;
exit 1: no such sandbox, or the registry cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from proxy import share
from proxy.config import CONFIG_PATH_ENV, ConfigError, ProxyConfig, load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sandbox-proxy share",
                                     description="Print a share link for one sandbox port.")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--sandbox", required=True, help="sandbox id")
    parser.add_argument("--port", type=int, required=True, help="sandbox port the link opens")
    parser.add_argument("--ttl", type=int, required=True, help="seconds until the link expires")
    parser.add_argument("--scheme", default="https", choices=["https", "http"])
    parser.add_argument("--domain", default=None,
                        help="base domain of the URL (default: the first of [server] domains)")
    return parser.parse_args(argv)


async def _share_epoch(config: ProxyConfig, sandbox_id: str) -> int | None:
    from proxy.registry import open_registry
    registry = open_registry(config)
    await registry.start()
    try:
        record = await registry.get(sandbox_id)
    finally:
        await registry.close()
    return None if record is None else record.share_epoch


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config or os.environ.get(CONFIG_PATH_ENV) or None)
    except ConfigError as exc:
        print(f"sandbox-proxy: {exc}", file=sys.stderr)
        return 2
    if not config.access.share_key:
        print("sandbox-proxy share: share links are off: set [access] share_key or "
              "SANDBOX_PROXY_SHARE_KEY", file=sys.stderr)
        return 2
    problem = share.check_request(args.port, args.ttl, args.scheme)
    if problem is not None:
        print(f"sandbox-proxy share: {problem}", file=sys.stderr)
        return 2
    domain = args.domain or sorted(config.server.domains)[0]
    try:
        epoch = asyncio.run(_share_epoch(config, args.sandbox))
    except ConfigError as exc:
        print(f"sandbox-proxy share: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a store that cannot be reached (Redis, DNS): any client error
        print(f"sandbox-proxy share: registry unavailable: {exc or type(exc).__name__}",
              file=sys.stderr)
        return 1
    if epoch is None:
        print(f"sandbox-proxy share: no sandbox {args.sandbox!r} in the registry",
              file=sys.stderr)
        return 1
    expiry = int(time.time()) + args.ttl
    token = share.mint(config.access.share_key.encode(), args.sandbox, args.port, expiry, epoch)
    print(share.share_url(args.scheme, domain, args.sandbox, args.port, token))
    return 0
