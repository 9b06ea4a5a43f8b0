"""Structured logs: one event per line, as text (default) or as JSON objects.

A log call names its event and fields with ``extra``:
    log.info("destination: %s -> %s", a, b, extra={"event": "state", "migration_id": mid, "from": a, "to": b})
JSON lines carry ts (UTC, ISO 8601), level, logger, event (the message where none was named),
msg, the fields, and error (the traceback) where there is one. Text lines append the fields
as key=value."""
from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
# Everything a LogRecord has of its own; whatever else it carries came with ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# How a process passes its -v and --log-format to the processes it starts (the demo's source).
LOG_FORMAT_ENV = "POSTCOPY_LOG_FORMAT"
VERBOSE_ENV = "POSTCOPY_VERBOSE"
_configured: dict[str, str] = {}
_handler: logging.Handler | None = None  # ours: replaced by the next setup, others left alone


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call gave with ``extra`` (``event`` among them, if named)."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        message = record.getMessage()
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": fields.pop("event", None) or message,
            "msg": message,
            **fields,
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        # default=str: a field that is no JSON type (an enum, a path) is written as its text.
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = fields_of(record)
        if not fields:
            return text
        # The fields go on the first line, so that one event stays one line to grep.
        first, newline, rest = text.partition("\n")
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{first} [{pairs}]{newline}{rest}"


def setup_logging(verbose: bool, fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at INFO with ``verbose``, else WARNING, in ``fmt``."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: choose one of {', '.join(LOG_FORMATS)}")
    global _handler
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    _configured.update({LOG_FORMAT_ENV: fmt, VERBOSE_ENV: "1" if verbose else "0"})


def child_env() -> dict[str, str]:
    """Environment entries that make a child `postcopy` process log as this one does."""
    return dict(_configured)
