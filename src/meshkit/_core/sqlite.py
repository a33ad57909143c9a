"""The one way meshkit opens a shared SQLite file and writes to it (the broker and the registry use it).

Every process on the host opens the same file in WAL mode with ``synchronous=NORMAL`` (a commit survives a process
crash; an OS crash may lose the last few, as the docs say) and writes in short ``BEGIN IMMEDIATE`` transactions
taken through :func:`write_transaction`, which shares the write lock fairly between processes.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from meshkit.errors import ConfigurationError

__all__ = ["begin_immediate", "open_database", "write_transaction"]

_BUSY_WAIT = 30.0  # seconds a writer keeps trying for the lock before the error surfaces


def open_database(path: Path, schema: str, *, what: str) -> sqlite3.Connection:
    """Open (creating if needed) the file at ``path`` with ``schema``; ``what`` names it in errors."""
    if not path.parent.exists():
        raise ConfigurationError(
            f"cannot open the {what} at {path}: the folder {path.parent} does not exist",
            hint=f"create it (mkdir -p {path.parent}) or point the URL elsewhere",
        )
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
        db.execute("PRAGMA busy_timeout=2")  # from here on, waits for the write lock are ours: see write_transaction
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot open the {what} at {path}: {exc}") from exc
    return db


def begin_immediate(db: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``: take the write lock fairly.

    SQLite's own busy handler sleeps 1, 2, 5, ... up to 100 ms between tries, so under steady contention a writer
    that lost once keeps losing to writers that never had to wait: a member of a group was starved that way. The
    connection's busy timeout is tiny; this loop retries after a short random pause, so every waiter gets a
    chance every millisecond or so.
    """
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.0002, 0.0015))
        else:
            return


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One short write transaction, taking the lock fairly (:func:`begin_immediate`)."""
    begin_immediate(db)
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
