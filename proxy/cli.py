"""Command line: `sandbox-proxy [--config PATH] [--listen HOST:PORT] [--log-level LEVEL]`,
and `sandbox-proxy share ...` (proxy/share_cli.py) to mint share links.

Where settings come from, the first that has one winning: the command line, the environment
(SANDBOX_PROXY_* variables, proxy/config.py ENVIRONMENT_KEYS), the config file (--config, else
the SANDBOX_PROXY_CONFIG variable, else none), the built-in defaults.

Exit status 2 means the configuration or registry file is unusable; the message names the file
(or the variable), the key and the problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from proxy import __version__, diagnostic_log
from proxy.config import CONFIG_PATH_ENV, LOG_LEVELS, ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sandbox-proxy",
        description="Edge proxy routing <port>-<sandboxId>.<domain> to sandbox backends.")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"TOML config file (default: ${CONFIG_PATH_ENV}, else built-in "
                             "defaults)")
    parser.add_argument("--listen", default=None, metavar="HOST:PORT",
                        help="edge listener address, overriding [server] listen")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and registry, then exit")
    parser.add_argument("--log-level", default=None, type=str.lower, choices=LOG_LEVELS,
                        help="diagnostic log level, overriding [log] level")
    parser.add_argument("--version", action="version", version=f"sandbox-proxy {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["share"]:
        from proxy.share_cli import main as share_main
        return share_main(argv[1:])
    args = parse_args(argv)
    diagnostic_log.start()
    from proxy.registry import open_registry
    from proxy.server import run

    config_path = args.config or os.environ.get(CONFIG_PATH_ENV) or None
    try:
        config = load_config(config_path, args.listen, log_level=args.log_level)
        diagnostic_log.apply(config.log)
        if args.check:
            registry = open_registry(config)
            print(f"ok: {len(registry)} sandboxes")
            return 0
        return run(config)
    except ConfigError as exc:
        print(f"sandbox-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the listen address is in use
        print(f"sandbox-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
