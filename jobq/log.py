"""Logging for jobq's processes: text or JSON lines, to stderr or a file that logrotate moves."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

#: The text format: time, level, process, logger, message.
TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; job lines carry ``job_id`` and ``task`` (``extra=``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("job_id", "task", "worker", "queue"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", file: str = "") -> logging.Handler:
    """Configure the ``jobq`` logger (idempotent); returns its handler."""
    logger = logging.getLogger("jobq")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler: logging.Handler
    if file:
        handler = logging.FileHandler(os.path.expanduser(file), encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return handler


def reopen() -> None:
    """Reopen log files (after logrotate moved them; SIGUSR1 in the master)."""
    for handler in logging.getLogger("jobq").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
