"""Dead letters: list, replay or discard the messages a topic's handlers gave up on.

Replays and discards are recorded in the audit file the dashboard shows (``.meshkit/audit.jsonl`` beside the
settings file, ``$MESHKIT_CONFIG`` or ``./meshkit.toml``; ``--audit`` to name another), by ``cli:<user>@<host>``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshkit._core.settings import load_settings, settings_file
from meshkit.dashboard.audit import AuditEntry, append_audit, audit_file
from meshkit.errors import ConfigurationError
from meshkit.messaging import Broker, Message, connect

app = typer.Typer(help=__doc__, no_args_is_help=True)

UrlOption = Annotated[str | None, typer.Option("--url", help="The broker URL (default: broker.url from the settings).")]


def _broker(url: str | None) -> Broker:
    url = url or load_settings().broker.url
    if url.startswith("memory:"):
        raise ConfigurationError(
            "a memory:// broker lives inside its process; the CLI cannot reach it",
            hint="point --url (or broker.url) at the broker the services use, such as sqlite:///.meshkit/broker.db",
        )
    return connect(url)


def _row(message: Message) -> dict[str, object]:
    h = message.headers
    return {
        "id": message.id,
        "original_id": h.get("dlqid"),
        "group": h.get("dlqgroup"),
        "deliveries": int(h.get("dlqdeliveries", "0")),
        "reason": h.get("dlqreason"),
        "data": message.data if not isinstance(message.data, bytes) else message.data.decode("utf-8", "replace"),
    }


@app.command("ls")
def list_dead_letters(
    topic: Annotated[str, typer.Argument(help="The topic whose dead letters to show (not the .dlq name).")],
    url: UrlOption = None,
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List dead letters with the reason each one failed."""

    async def run() -> list[Message]:
        async with _broker(url) as broker:
            return await broker.dead_letters(topic).list(limit)

    messages = asyncio.run(run())
    if as_json:
        for message in messages:
            typer.echo(json.dumps(_row(message), default=str))
        return
    table = Table(title=f"dead letters of {topic} ({len(messages)})")
    for column in ("id", "group", "deliveries", "reason", "data"):
        table.add_column(column, overflow="fold")
    for message in messages:
        row = _row(message)
        table.add_row(
            str(row["id"]),
            str(row["group"]),
            str(row["deliveries"]),
            str(row["reason"]),
            json.dumps(row["data"], default=str)[:200],
        )
    Console(highlight=False).print(table)


def _who() -> str:
    """Who settles dead letters from here, as the audit's ``client``: ``cli:<user>@<host>``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor the password database
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def _audit(path: Path, entry: AuditEntry) -> None:
    try:
        append_audit(path, entry)
    except OSError as exc:  # the action is done: say that it went unrecorded, as the dashboard does
        typer.echo(f"warning: could not record this {entry.action} in the audit file {path}: {exc}", err=True)


def _settle(topic: str, ids: list[str] | None, url: str | None, yes: bool, audit: Path, *, replay: bool) -> None:
    verb = "replay" if replay else "discard"
    chosen = list(dict.fromkeys(ids or ()))
    what = f"{len(chosen)} chosen dead letters" if chosen else "every dead letter"
    if not yes and not typer.confirm(f"{verb} {what} of {topic}?", default=False):
        raise typer.Exit(1)

    broker = _broker(url)  # a URL the CLI cannot use is refused before anything is tried (and audited)

    async def run() -> int:
        async with broker:
            dead = broker.dead_letters(topic)
            return await (dead.replay(chosen or None) if replay else dead.discard(chosen or None))

    try:
        count = asyncio.run(run())
    except Exception as exc:
        _audit(audit, AuditEntry(time.time(), verb, topic, tuple(chosen), 0, f"{type(exc).__name__}: {exc}", _who()))
        raise
    _audit(audit, AuditEntry(time.time(), verb, topic, tuple(chosen), count, client=_who()))
    typer.echo(f"{'replayed' if replay else 'discarded'} {count} dead letter{'s' if count != 1 else ''} of {topic}")


IdsOption = Annotated[list[str] | None, typer.Option("--id", help="Only these dead letters (repeatable).")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
AuditOption = Annotated[
    Path | None,
    typer.Option(
        "--audit",
        help="The audit file the dashboard shows, to record this in (default: .meshkit/audit.jsonl beside the "
        "settings file, $MESHKIT_CONFIG or ./meshkit.toml).",
        dir_okay=False,
    ),
]


def _audit_file(given: Path | None) -> Path:
    """``given``, else the system's audit file: in ``.meshkit`` of the folder whose settings the CLI reads (where
    ``meshkit run`` keeps it)."""
    if given is not None:
        return given
    settings = settings_file()
    return audit_file(Path(settings).parent if settings else Path())


@app.command("replay")
def replay(
    topic: Annotated[str, typer.Argument(help="The topic to send the dead letters back to.")],
    ids: IdsOption = None,
    url: UrlOption = None,
    yes: YesOption = False,
    audit: AuditOption = None,
) -> None:
    """Send dead letters back to their topic, to be handled again."""
    _settle(topic, ids, url, yes, _audit_file(audit), replay=True)


@app.command("discard")
def discard(
    topic: Annotated[str, typer.Argument(help="The topic whose dead letters to drop.")],
    ids: IdsOption = None,
    url: UrlOption = None,
    yes: YesOption = False,
    audit: AuditOption = None,
) -> None:
    """Drop dead letters for good."""
    _settle(topic, ids, url, yes, _audit_file(audit), replay=False)
