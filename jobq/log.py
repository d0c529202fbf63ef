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


class Repeats:
    """Log lines that would repeat (a worker crashing again and again): the first of a kind is
    written; the same kind again within ``every`` seconds is counted, and the count written
    with the next one after that."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.logger, self.every = logger, every
        self.seen: dict[str, tuple[float, int]] = {}  # kind -> (when written, since then)

    def say(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        written, count = self.seen.get(kind, (-self.every, 0))
        if now - written < self.every:
            self.seen[kind] = (written, count + 1)
            return
        if count:
            message += f" (and {count} more time(s) in the last {now - written:.0f} s)"
        self.seen[kind] = (now, 0)
        self.logger.warning(message, *args)


class Trouble:
    """A condition that repeats until it is over (the server lost, refusing writes): said once
    when it starts, again at most every ``every`` seconds with how often it happened, and once
    when it is over, with how long it lasted. Never a line per attempt."""

    def __init__(self, logger: logging.Logger, what: str, *, pending: int = 0,
                 every: float = 60.0) -> None:
        self.logger, self.what, self.pending, self.every = logger, what, pending, every
        self.started = self.said = time.monotonic()
        self.count = 0
        kept = f"; {pending} result(s) kept until it is through" if pending else ""
        logger.warning("%s%s; trying again", what, kept)

    def again(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.said >= self.every:
            self.said = now
            self.logger.warning("%s (still, for %.0f s, %d attempt(s))", self.what,
                                now - self.started, self.count)

    def over(self) -> None:
        self.logger.warning("the server answers again after %.1f s%s",
                            time.monotonic() - self.started,
                            f"; {self.pending} result(s) sent" if self.pending else "")


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
