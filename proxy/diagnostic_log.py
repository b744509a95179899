"""Diagnostic log: what the proxy says about itself on stderr (start-up, reloads, registry and
backend trouble, errors), at `[log] level`, as text or as one JSON object per line
(`[log] format`). The access log, one line per request on stdout, is proxy/accesslog.py.

JSON lines carry `time` (UTC, milliseconds, as in the access log), `level`, `logger`,
`message`, `pid` (which worker said it) and, for a logged exception, `exception` (the traceback
as one string), so a log pipeline never has to join continuation lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from proxy.config import LogConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, never more than one line."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def start() -> None:
    """Before the config is read: text at info on stderr."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=TEXT_FORMAT)


def apply(settings: LogConfig) -> None:
    """Use the config's level and format (at start and on SIGHUP)."""
    root = logging.getLogger()
    root.setLevel(settings.level.upper())
    formatter = (JsonLineFormatter() if settings.format == "json"
                 else logging.Formatter(TEXT_FORMAT))
    for handler in root.handlers:
        handler.setFormatter(formatter)
