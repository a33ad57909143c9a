"""What the ``async with`` blocks of an outbox give: a database transaction that can also publish.

``tx.publish`` is synchronous: it checks and encodes the message at once (bad data raises here, before anything
commits), gives it its id and keeps it; the kept messages are inserted into ``meshkit_outbox`` in publish order
as the block ends, in the same transaction as the block's own statements.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshkit._core.database import Dialect, Row, Transaction
from meshkit._core.ids import new_id
from meshkit.errors import ConfigurationError, MessagingError
from meshkit.messaging import JsonCodec
from meshkit.messaging.message import check_extension
from meshkit.tracing import TRACE_HEADERS, current_headers

__all__ = ["InboxTransaction", "OutboxTransaction"]

_INSERT = (
    "INSERT INTO meshkit_outbox (id, source, topic, msg_key, type, subject, data, headers, trace, created)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CODEC = JsonCodec()


def _dumps(value: Mapping[str, str]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False)


class OutboxTransaction:
    """One database transaction of an :class:`~meshkit.outbox.Outbox`: statements run with ``execute``,
    ``executemany``, ``fetch`` and ``fetchone`` (SQL with ``?`` placeholders), messages are added with
    :meth:`publish`, and all of it commits together when the ``async with`` block ends without an error, or not at
    all. ``transaction`` is the underlying :class:`meshkit._core.database.Transaction`."""

    def __init__(self, transaction: Transaction, source: str) -> None:
        self.transaction = transaction
        self._source = source
        self._rows: list[tuple[Any, ...]] = []
        self._open = True

    @property
    def dialect(self) -> Dialect:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.transaction.dialect

    @property
    def published(self) -> list[str]:
        """The ids of the messages published in this transaction so far, in order."""
        return [row[0] for row in self._rows]

    def _check_open(self) -> None:
        if not self._open:
            raise ConfigurationError(
                "this outbox transaction is over", hint="use tx only inside its `async with` block"
            )

    async def execute(self, sql: str, *params: Any) -> int:
        """Run one statement; returns how many rows it changed."""
        self._check_open()
        return await self.transaction.execute(sql, *params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter row."""
        self._check_open()
        await self.transaction.executemany(sql, rows)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        """Run one query; returns its rows."""
        self._check_open()
        return await self.transaction.fetch(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """The first row of a query (None when it has none)."""
        self._check_open()
        return await self.transaction.fetchone(sql, *params)

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,  # the CloudEvents attribute's name
        subject: str | None = None,
        id: str | None = None,  # the CloudEvents attribute's name
    ) -> str:
        """Add a message to ``topic``, sent once the transaction commits (never if it rolls back); returns its id,
        which is also its id on the broker.

        ``data`` must encode as JSON (JSON values, a pydantic model, a dataclass): anything else raises
        :class:`~meshkit.errors.MessagingError` here, before anything commits. ``headers`` become CloudEvents
        extensions (1-20 lowercase letters or digits). The trace context current now (``traceparent``,
        ``tracestate``, ``baggage``) is kept with the message, so the relay's span continues this trace.
        Synchronous: nothing is written until the block ends.
        """
        self._check_open()
        if not topic or any(c.isspace() for c in topic):
            raise ConfigurationError(f"invalid topic name {topic!r}", hint="use a non-empty name without spaces")
        try:
            encoded, content_type = _CODEC.encode(data)
        except (TypeError, ValueError, RecursionError) as exc:
            raise MessagingError(
                f"cannot publish to {topic!r} through the outbox: {exc}",
                hint="pass JSON values (dict, list, str, int, float, bool, None), a pydantic model or a dataclass",
            ) from exc
        if content_type != _CODEC.content_type:
            raise MessagingError(
                f"cannot publish {type_name(data)} to {topic!r} through the outbox: its data must be JSON",
                hint="pass JSON values, a pydantic model or a dataclass (bytes: encode them, e.g. as base64 text)",
            )
        trace = current_headers()
        extensions: dict[str, str] = {}
        for name, value in (headers or {}).items():
            if name in TRACE_HEADERS:  # a publisher's explicit trace context wins over the current one
                trace[name] = str(value)
                continue
            try:
                extensions[check_extension(name)] = str(value)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from exc
        message_id = id if id is not None else new_id()
        self._rows.append(
            (
                message_id,
                self._source,
                topic,
                None if key is None else str(key),
                type,
                subject,
                encoded.decode(),
                _dumps(extensions),
                _dumps(trace),
                time.time(),
            )
        )
        return message_id

    async def _write(self) -> None:
        """Insert the kept messages (the block ended without an error; the transaction is about to commit)."""
        if self._rows:
            await self.transaction.executemany(_INSERT, self._rows)

    def _close(self) -> None:
        self._open = False


class InboxTransaction(OutboxTransaction):
    """The transaction of :meth:`Outbox.receive <meshkit.outbox.Outbox.receive>`: an :class:`OutboxTransaction`
    that also records the message as handled by its consumer.

    ``duplicate`` is True when that consumer already handled this message (the handler should do nothing then).
    A duplicate's block is rolled back whatever it ran: its statements do not commit and its publishes are
    dropped, so a handler that forgets to look still changes nothing in the database.
    """

    def __init__(self, transaction: Transaction, source: str, *, duplicate: bool) -> None:
        super().__init__(transaction, source)
        self.duplicate = duplicate


def type_name(value: Any) -> str:
    return f"a {type(value).__name__}"
