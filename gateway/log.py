"""Structured logging: one JSON object (or key=value text) per line.

Every message and every delivery attempt is logged as one event with its queue
id, Message-ID, sender, recipients, result and reply, so an operator can follow
a message with ``grep QID``.

A message costs several events, so the path is kept short: one JSON encoder for
every line, no caller lookup (the event name says where it comes from), and on
the event loop the lines written in one loop iteration are flushed together at
its end (one write instead of one per line; a line is never held longer than
that iteration).  Elsewhere (threads, commands) every line is flushed at once.
When the JSON handler of :func:`setup` is the logger's only handler (as in
``coffer serve``), :func:`event` writes the line itself, without a LogRecord
(whose creation, with its getpid() system call and thread lookups, cost more
than the JSON encoding); the line is the same as the formatter's.
"""

from __future__ import annotations

import asyncio
import json
import json.encoder as _json_encoder
import logging
import sys
import time
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("coffer")

# json.dumps(obj, ensure_ascii=False, default=str) builds this encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
# _ENCODER.encode(obj) still builds the C encoder (json.encoder.c_make_encoder) on
# every call, with a fresh dict for its circular-reference check; this one is built
# once, with the same arguments, for event()'s direct path (1 µs a line of 3).  It
# is used only under the JSON handler's lock (one caller at a time), and its dict,
# which a failed encoding may leave entries in, is emptied then.
_MARKERS: dict[int, Any] = {}
_make_encoder: Any = getattr(_json_encoder, "c_make_encoder", None)  # not in typeshed
_C_ENCODER: Any = (
    None if _make_encoder is None else _make_encoder(
        _MARKERS, _ENCODER.default, _json_encoder.encode_basestring, _ENCODER.indent,
        _ENCODER.key_separator, _ENCODER.item_separator, _ENCODER.sort_keys,
        _ENCODER.skipkeys, _ENCODER.allow_nan))


# Fields every line of this process carries, after "event" and before the event's own
# (a worker process's index: with several workers their lines interleave in one file).
_PROCESS_FIELDS: dict[str, Any] = {}


def bind_process(**fields: Any) -> None:
    """Add ``fields`` to every later line of this process (e.g. ``worker=1``)."""
    _PROCESS_FIELDS.update(fields)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        obj.update(_PROCESS_FIELDS)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            obj.update(fields)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(obj)


def _json_line(created: float, level: int, name: str, fields: dict[str, Any]) -> str:
    """What _JsonFormatter gives for event(name, level, **fields) logged at ``created``.

    Call it with the JSON handler's lock held (it shares _C_ENCODER)."""
    obj: dict[str, Any] = {
        "ts": round(created, 3),
        "level": logging.getLevelName(level).lower(),
        "event": name,
    }
    if _PROCESS_FIELDS:
        obj.update(_PROCESS_FIELDS)
    obj.update(fields)
    if _C_ENCODER is None:
        return _ENCODER.encode(obj)
    try:
        return "".join(_C_ENCODER(obj, 0))
    except BaseException:
        _MARKERS.clear()  # what a fresh encoder would start from
        raise


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {**_PROCESS_FIELDS, **(getattr(record, "fields", None) or {})}
        kv = " ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}"
                      for k, v in fields.items())
        line = f"{stamp} {record.levelname.lower()} {record.getMessage()} {kv}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _LoopFlush:
    """Flush at the end of the event loop's iteration when called on the loop."""

    # The loop a flush is scheduled on; per loop, since a process may run several
    # loops one after another (a flush left pending on a closed one never runs).
    _flush_loop: asyncio.AbstractEventLoop | None = None

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()  # type: ignore[misc]
            return
        if self._flush_loop is not loop:
            self._flush_loop = loop
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_loop = None
        super().flush()  # type: ignore[misc]


class _FileHandler(_LoopFlush, logging.FileHandler):
    pass


class _StreamHandler(_LoopFlush, logging.StreamHandler):  # type: ignore[type-arg]
    pass


# setup()'s JSON handler, which event() may write to directly (see _direct).
_json_handler: _FileHandler | _StreamHandler | None = None


def setup(level: str = "INFO", fmt: str = "json", file: Path | None = None) -> None:
    global _json_handler
    handler: _FileHandler | _StreamHandler = (
        _FileHandler(file, encoding="utf-8") if file else _StreamHandler(sys.stderr)
    )
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    _json_handler = handler if fmt == "json" else None
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def _direct(level: int) -> _FileHandler | _StreamHandler | None:
    """setup()'s JSON handler if a line may go straight to it: it is the only
    handler the record would reach (none added by a test or a caller, no
    propagation to the root logger's), it takes the level, and nothing filters."""
    handler = _json_handler
    handlers = LOGGER.handlers
    if (handler is None or len(handlers) != 1 or handlers[0] is not handler
            or LOGGER.propagate or level < handler.level or LOGGER.filters
            or handler.filters):
        return None
    return handler


def _record(name: str, level: int, fields: dict[str, Any]) -> logging.LogRecord:
    # Logger.log without its caller lookup (findCaller walks the stack).
    return LOGGER.makeRecord(LOGGER.name, level, "(unknown file)", 0, name, (), None,
                             extra={"fields": fields})


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event, e.g. event("delivery", qid=..., rcpt=..., result=...)."""
    if not LOGGER.isEnabledFor(level):
        return
    handler = _direct(level)
    stream = handler.stream if handler is not None else None
    if handler is None or stream is None:  # (a closed FileHandler reopens in emit)
        LOGGER.handle(_record(name, level, fields))
        return
    # What Handler.handle + StreamHandler.emit do, minus the LogRecord.
    with handler.lock:  # type: ignore[union-attr]  # set by Handler.createLock
        try:
            stream.write(_json_line(time.time(), level, name, fields) + handler.terminator)
            handler.flush()
        except RecursionError:
            raise
        except Exception:
            handler.handleError(_record(name, level, fields))
