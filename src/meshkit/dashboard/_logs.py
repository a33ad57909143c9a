"""The dashboard's log view: a bounded ring buffer of recent log records, fed by logging and by child processes.

:class:`LogBuffer` keeps the last ``capacity`` records (5,000 by default; the oldest go first). Two ways in:

- ``logging.getLogger().addHandler(buffer.handler())`` stores records of this process. The service is the record's
  ``service`` extra when it has one (meshkit logs ``extra={"service": ...}``), else the logger's name; a record's
  ``trace_id`` / ``span_id`` attributes (set by :class:`meshkit.tracing.spans.TraceLogFilter`, or passed as extras)
  join it to its trace. Other extras are kept as text in :attr:`LogEntry.fields`.
- ``buffer.append_line(service, line)`` stores one output line of a child process. A line that starts with a level
  name (``ERROR name: message``, the runner's child format) or is a JSON object (``{"level": ..., "message": ...}``)
  is parsed; other lines (traceback lines) take the level of the service's previous line.

:meth:`LogBuffer.query` filters by service, minimum level, trace id and text, and takes a ``since`` cursor: every
entry has a sequence number, and a page returns the buffer's latest number as its cursor, so a live tail asks for
``since=<cursor>`` each time and gets only what is new. The buffer is thread-safe (handlers run on any thread).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from meshkit._core.clock import Clock, MonotonicClock

__all__ = ["LEVELS", "LogBuffer", "LogEntry", "LogPage"]

#: Level names the buffer knows, by number (``WARN`` and ``FATAL`` are read as ``WARNING`` and ``CRITICAL``).
LEVELS: Final = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_ALIASES: Final = {"WARN": "WARNING", "FATAL": "CRITICAL", "ERR": "ERROR"}

# The attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "service", "trace_id", "span_id", "taskName"}
)
_LEADING_LEVEL: Final = re.compile(
    r"^\s*\[?(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]?(?::\s*|\s+)(?:(?P<logger>[\w.\-]+):\s)?"
    r"(?P<message>.*)$",
    re.IGNORECASE,
)
_TRACE_ID: Final = re.compile(r"\btrace_id[=:]\s*\"?([0-9a-f]{32})\b")
_MAX_MESSAGE = 16_000  # characters kept of one message
_MAX_FIELD = 500  # characters kept of one extra's text


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One stored record. ``time`` is Unix seconds; ``level`` an upper-case name of :data:`LEVELS`."""

    seq: int
    time: float
    service: str
    level: str
    message: str
    logger: str = ""
    trace_id: str = ""
    span_id: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def levelno(self) -> int:
        return LEVELS.get(self.level, 20)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "service": self.service,
            "level": self.level,
            "logger": self.logger,
            "message": self.message,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "fields": self.fields,
        }


class LogPage(NamedTuple):
    """What :meth:`LogBuffer.query` returns: the matching entries (oldest first), the buffer's latest sequence
    number (pass it back as ``since``), and whether older matches were left out to respect ``limit``."""

    entries: list[LogEntry]
    cursor: int
    truncated: bool


def level_name(level: str | int) -> str:
    """The canonical name of ``level`` (a name, an alias or a number); raises ``ValueError`` if unknown."""
    if isinstance(level, int):
        for name, number in sorted(LEVELS.items(), key=lambda kv: -kv[1]):
            if level >= number:
                return name
        return "DEBUG"
    text = level.strip().upper()
    if text.isdigit():
        return level_name(int(text))
    text = _ALIASES.get(text, text)
    if text not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(n.lower() for n in LEVELS)}")
    return text


class _BufferHandler(logging.Handler):
    """A logging handler that stores records in a :class:`LogBuffer`."""

    def __init__(self, buffer: LogBuffer, level: int) -> None:
        super().__init__(level)
        self.buffer = buffer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.append_record(record, formatter=self.formatter)
        except Exception:
            self.handleError(record)


class LogBuffer:
    """The last ``capacity`` log entries of a running system (see the module docstring)."""

    def __init__(self, capacity: int = 5000, *, clock: Clock | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.clock = clock or MonotonicClock()
        self._entries: deque[LogEntry] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self._last_level: dict[str, str] = {}  # service -> level of its previous line (for continuation lines)
        self._exc_formatter = logging.Formatter()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def cursor(self) -> int:
        """The sequence number of the latest entry (0 when nothing was ever stored)."""
        return self._seq

    def handler(self, level: int = logging.NOTSET) -> logging.Handler:
        """A :class:`logging.Handler` that stores the records it gets here (add it to a logger)."""
        return _BufferHandler(self, level)

    # -- writing -------------------------------------------------------------------------------------------------

    def append(
        self,
        service: str,
        level: str | int,
        message: str,
        *,
        logger: str = "",
        trace_id: str = "",
        span_id: str = "",
        time: float | None = None,
        fields: dict[str, str] | None = None,
    ) -> LogEntry:
        """Store one entry; returns it. ``time`` defaults to now (the clock's wall time)."""
        name = level_name(level)
        stamp = self.clock.wall() if time is None else time
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "…"
        with self._lock:
            self._seq += 1
            entry = LogEntry(
                self._seq, stamp, service, name, message, logger, trace_id, span_id, fields if fields else {}
            )
            self._entries.append(entry)
        return entry

    def append_record(self, record: logging.LogRecord, *, formatter: logging.Formatter | None = None) -> LogEntry:
        """Store a :class:`logging.LogRecord` (what the handler does)."""
        service = getattr(record, "service", None)
        if not isinstance(service, str) or not service:
            service = record.name
        message = record.getMessage()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = (formatter or self._exc_formatter).formatException(record.exc_info)
            message = f"{message}\n{record.exc_text}"
        elif record.exc_text:
            message = f"{message}\n{record.exc_text}"
        fields = {
            key: _field_text(value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        }
        return self.append(
            service,
            record.levelno,
            message,
            logger=record.name,
            trace_id=_text_attr(record, "trace_id"),
            span_id=_text_attr(record, "span_id"),
            time=record.created,
            fields=fields,
        )

    def append_line(self, service: str, line: str) -> LogEntry | None:
        """Store one output line of ``service``'s process; blank lines are skipped (returns None)."""
        line = line.rstrip()
        if not line.strip():
            return None
        if line.lstrip().startswith("{"):
            entry = self._append_json(service, line)
            if entry is not None:
                return entry
        match = _LEADING_LEVEL.match(line)
        if match is not None:
            level = level_name(match["level"])
            logger, message = match["logger"] or "", match["message"]
        else:
            level, logger, message = self._last_level.get(service, "INFO"), "", line
        trace = _TRACE_ID.search(message)
        self._remember(service, level)
        return self.append(service, level, message, logger=logger, trace_id=trace[1] if trace else "")

    def _append_json(self, service: str, line: str) -> LogEntry | None:
        try:
            document = json.loads(line)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        raw_level = document.get("level", document.get("levelname", document.get("severity", "INFO")))
        try:
            level = level_name(raw_level if isinstance(raw_level, str | int) else "INFO")
        except ValueError:
            level = "INFO"
        message = document.get("message", document.get("msg", document.get("event", line)))
        self._remember(service, level)
        return self.append(
            service,
            level,
            message if isinstance(message, str) else json.dumps(message),
            logger=str(document.get("logger", document.get("name", ""))),
            trace_id=str(document.get("trace_id", "")),
            span_id=str(document.get("span_id", "")),
        )

    def _remember(self, service: str, level: str) -> None:
        if len(self._last_level) > 1000 and service not in self._last_level:
            self._last_level.clear()
        self._last_level[service] = level

    def clear(self) -> None:
        """Drop every entry (the sequence numbers keep counting)."""
        with self._lock:
            self._entries.clear()

    # -- reading -------------------------------------------------------------------------------------------------

    def query(
        self,
        *,
        service: str | None = None,
        level: str | int | None = None,
        trace_id: str | None = None,
        text: str | None = None,
        since: int = 0,
        limit: int = 500,
    ) -> LogPage:
        """Entries newer than ``since`` that match every filter given, oldest first, at most the newest ``limit``.

        ``level`` is a minimum (``"warning"`` keeps warnings, errors and critical entries); ``text`` matches the
        message or the logger name, ignoring case; ``trace_id`` matches exactly (case-insensitive hex).
        Raises ``ValueError`` for an unknown level or a ``limit`` below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        floor = LEVELS[level_name(level)] if level is not None and level != "" else None
        wanted_service = service or None
        wanted_trace = trace_id.lower() if trace_id else None
        needle = text.lower() if text else None
        with self._lock:
            entries = list(self._entries)
            cursor = self._seq
        start = bisect.bisect_right(entries, since, key=lambda e: e.seq)
        matched = [
            e
            for e in entries[start:]
            if (wanted_service is None or e.service == wanted_service)
            and (floor is None or e.levelno >= floor)
            and (wanted_trace is None or e.trace_id.lower() == wanted_trace)
            and (needle is None or needle in e.message.lower() or needle in e.logger.lower())
        ]
        truncated = len(matched) > limit
        return LogPage(matched[-limit:], cursor, truncated)

    def services(self) -> list[str]:
        """The services with an entry in the buffer, sorted."""
        with self._lock:
            return sorted({e.service for e in self._entries})


def _text_attr(record: logging.LogRecord, name: str) -> str:
    value = getattr(record, name, "")
    return value if isinstance(value, str) else ""


def _field_text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_FIELD else text[:_MAX_FIELD] + "…"
