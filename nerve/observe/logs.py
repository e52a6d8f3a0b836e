"""Structured logs: one JSON object a line, or coloured console lines on a terminal.

Records about an event carry its context as fields (``ctx.log`` adds them; the
runtime's own messages about an event pass them as ``extra``): ``event_id``,
``event_type``, ``function``, ``attempt``, ``correlation_id`` and, when tracing is on,
``trace_id``/``span_id`` (from the record, else from the current OpenTelemetry span).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "StderrHandler", "setup_logging"]

CONTEXT_FIELDS = (
    "event_id",
    "event_type",
    "function",
    "attempt",
    "correlation_id",
    "trace_id",
    "span_id",
)
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _current_span() -> tuple[str, str] | None:
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported: tracing is off, nothing to look up
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", <context fields>, <extra>...}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and value is not None:
                doc[name] = value
        if "trace_id" not in doc:
            span = _current_span()
            if span is not None:
                doc["trace_id"], doc["span_id"] = span
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class _ConsoleContext(logging.Formatter):
    """For the console: the message, then the event context in short."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        parts = []
        function = getattr(record, "function", None)
        if function:
            parts.append(f"fn={function}")
        event_type = getattr(record, "event_type", None)
        if event_type:
            parts.append(f"type={event_type}")
        event_id = getattr(record, "event_id", None)
        if event_id:
            parts.append(f"event={event_id}")
        attempt = getattr(record, "attempt", None)
        if attempt and attempt > 1:
            parts.append(f"attempt={attempt}")
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            parts.append(f"trace={trace_id}")
        return f"{message}  [{' '.join(parts)}]" if parts else message


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing to whatever ``sys.stderr`` is when a record is emitted,
    not the stream of when the handler was made (which someone may have closed since:
    a test runner's capture, a daemonised process)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always sys.stderr


def setup_logging(level: str, fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Configure the root logger: ``fmt`` is 'json', 'console' or 'auto' (console on a
    terminal, JSON otherwise). Without ``stream``, records go to ``sys.stderr`` as it
    is at the time of each record."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(stream) if stream is not None else StderrHandler()
        handler.setFormatter(JsonFormatter())
    elif fmt == "console":
        from rich.console import Console
        from rich.logging import RichHandler

        # file=None with stderr=True: rich looks sys.stderr up on every write
        console = Console(file=stream, stderr=stream is None, highlight=False)
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(_ConsoleContext("%(name)s: %(message)s"))
    else:
        raise ValueError(f"log format {fmt!r}: use json, console or auto")
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
