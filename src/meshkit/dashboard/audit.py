"""The dead-letter audit: who replayed or discarded which dead letters, kept as JSON lines in one file.

The dashboard (its replay / discard actions) and ``meshkit dlq replay|discard`` both append here, to the system's
``.meshkit/audit.jsonl``, so the dashboard's Audit table shows what was done from either::

    append_audit(path, AuditEntry(time.time(), "replay", "order.created", ("id-1",), 1, client="cli:ada@laptop"))
    entries = read_audit(path, 1000)  # the last 1000, oldest first

An entry is one line (:meth:`AuditEntry.to_json`), flushed to disk before the call returns. Writers in several
processes take an exclusive ``flock`` on the file for each append, readers a shared one (where the platform has
``flock``), and a last line
cut short (a writer died while writing it) is ended before the next entry, so that only it is lost. Reading starts
from the end of the file, so its cost does not grow with the history; a line that is not an entry is skipped with a
warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from meshkit.errors import ConfigurationError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per file is the caller's affair
    fcntl = None  # type: ignore[assignment]

__all__ = ["STATE_DIR", "AuditEntry", "append_audit", "audit_file", "read_audit"]

log = logging.getLogger(__name__)

STATE_DIR = ".meshkit"  # a system's own files, in the folder ``meshkit run`` is pointed at


def audit_file(folder: Path) -> Path:
    """The audit file of the system in ``folder`` (``meshkit run`` and ``meshkit dlq`` both write to it)."""
    return folder / STATE_DIR / "audit.jsonl"


_AUDIT_BLOCK = 64 * 1024  # bytes read at a time from the end of the audit file


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One replay or discard of dead letters, at ``time`` (Unix seconds). ``ids`` are the dead letters asked for
    (empty: every one, as ``meshkit dlq replay`` without ``--id`` asks); ``count`` is how many messages it settled;
    ``error`` says why it failed (then ``count`` is 0); ``client`` says who asked: the address a dashboard request
    came from (the dashboard has no users: behind a proxy, the proxy's), or ``cli:<user>@<host>`` for the CLI."""

    time: float
    action: str
    topic: str
    ids: tuple[str, ...]
    count: int
    error: str | None = None
    client: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as ``/api/audit`` serves it and the audit file stores it (one line each)."""
        return {
            "time": self.time,
            "action": self.action,
            "topic": self.topic,
            "ids": list(self.ids),
            "requested": len(self.ids),
            "count": self.count,
            "error": self.error,
            "client": self.client,
        }

    @classmethod
    def from_json(cls, document: Any) -> AuditEntry:
        """The entry :meth:`to_json` gave (``requested`` is derived, so ignored); TypeError if it is not one."""
        if not isinstance(document, dict):
            raise TypeError("an audit entry is a JSON object")
        time, ids, count = document.get("time"), document.get("ids"), document.get("count")
        action, topic = document.get("action"), document.get("topic")
        error, client = document.get("error"), document.get("client")
        if not isinstance(time, int | float) or isinstance(time, bool) or not math.isfinite(time):
            raise TypeError(f"time must be a number of seconds, got {time!r}")
        if not isinstance(action, str) or not isinstance(topic, str):
            raise TypeError("action and topic must be strings")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError("ids must be a list of strings")
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"count must be an integer, got {count!r}")
        if not isinstance(error, str | None) or not isinstance(client, str | None):
            raise TypeError("error and client must be strings or null")
        return cls(float(time), action, topic, tuple(ids), count, error, client)


def append_audit(path: Path, entry: AuditEntry, lock: threading.Lock | None = None) -> None:
    """Append ``entry`` to the audit file at ``path`` (its folder is made if need be) and flush it to disk.
    Blocking: run it on a worker thread from async code. ``lock`` serializes the writers of one process (the
    file lock serializes processes). Raises OSError when the file cannot be written."""
    line = (json.dumps(entry.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    with lock if lock is not None else contextlib.nullcontext():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as file:
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # released when the file closes
            end = file.seek(0, os.SEEK_END)
            if end:
                file.seek(end - 1)
                if file.read(1) != b"\n":
                    line = b"\n" + line
            file.write(line)  # append mode: at the end, whatever the position
            file.flush()
            os.fsync(file.fileno())


def read_audit(path: Path, size: int) -> list[AuditEntry]:
    """The last ``size`` entries of the audit file at ``path``, oldest first (none if it does not exist). A file
    that cannot be read (a folder, no permission) raises :class:`~meshkit.errors.ConfigurationError`."""
    entries: list[AuditEntry] = []
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return entries
    except OSError as exc:  # a directory, no permission: the audit would be lost, so say it at once
        raise ConfigurationError(
            f"cannot read the dashboard's audit file {path}: {exc}", hint="audit_path must name a readable file"
        ) from exc
    with file:
        if fcntl is not None:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH)  # not halfway through another process's append
        for offset, raw in _lines_backwards(file):
            if not raw.strip():
                continue
            try:
                entries.append(AuditEntry.from_json(json.loads(raw)))
            except (ValueError, TypeError) as exc:  # not JSON (or not UTF-8), or not an entry
                log.warning(
                    "skipped a line of the dashboard's audit file that is not an audit entry",
                    extra={"path": str(path), "offset": offset, "reason": str(exc)},
                )
                continue
            if len(entries) == size:
                break
    entries.reverse()
    return entries


def _lines_backwards(file: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """The lines of a binary ``file``, last first, each with the byte offset where it starts."""
    position = file.seek(0, os.SEEK_END)
    partial = b""
    while position > 0:
        step = min(_AUDIT_BLOCK, position)
        position -= step
        file.seek(position)
        chunk = file.read(step) + partial
        first, *lines = chunk.split(b"\n")
        end = position + len(chunk)
        for line in reversed(lines):
            end -= len(line)
            yield end, line
            end -= 1
        partial = first
    yield 0, partial
