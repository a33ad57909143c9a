"""Run a system of services: every service a meshkit.toml lists, in one process or one process each."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from meshkit.errors import ConfigurationError
from meshkit.runner import Ready, Supervisor, dev_token, gateway_config, load_system, run_monolith
from meshkit.tracing.spans import console_logging


def _replicas(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise ConfigurationError(f"--replicas {value!r} is not name=N", hint="e.g. --replicas payments=3")
        out[name] = int(count)
    return out


def run(
    path: Annotated[Path, typer.Argument(help="A folder with a meshkit.toml (or the file itself).")],
    mode: Annotated[
        str, typer.Option("--mode", help="monolith: one process; processes: one process per instance.")
    ] = "processes",
    replicas: Annotated[
        list[str] | None, typer.Option("--replicas", help="name=N: run N instances of a service (processes mode).")
    ] = None,
    host: Annotated[str, typer.Option(help="The address services listen on.")] = "127.0.0.1",
) -> None:
    """Run the services of PATH until Ctrl-C, then stop them gracefully (requests and handlers finish)."""
    if mode not in ("monolith", "processes"):
        raise ConfigurationError(f"unknown mode {mode!r}", hint="use --mode monolith or --mode processes")
    chosen: Literal["monolith", "processes"] = "monolith" if mode == "monolith" else "processes"
    counts = _replicas(replicas or [])
    if counts and chosen == "monolith":
        raise ConfigurationError("--replicas needs --mode processes", hint="a monolith runs one of each service")
    system = load_system(path)
    gateway = gateway_config(system)  # a broken gateway.yaml fails here, before anything starts
    console = Console(highlight=False)

    def ready(rows: Ready) -> None:
        table = Table(title=f"{system.folder.name}: ready ({chosen})")
        for column in ("service", "instance", "url"):
            table.add_column(column)
        for service, instance, url in rows:
            table.add_row(service, instance, url)
        console.print(table)
        readme = system.folder / "TRY.txt"
        if readme.is_file():
            first = {service: url for service, _, url in reversed(rows)}
            text = readme.read_text()
            for service, url in first.items():
                text = text.replace("{" + service + "}", url)
            token = dev_token(gateway) if gateway is not None and "{token}" in text else None
            text = text.replace("{token}", token or "<a token>")
            # soft_wrap: lines longer than the terminal (the token, the curl commands) are never broken, so they
            # paste as they are, from a terminal or from a log the output was piped to
            console.print(text.rstrip(), markup=False, soft_wrap=True)
        console.print("Ctrl-C stops everything.", style="dim")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if chosen == "monolith":
            await run_monolith(system, stop, host=host, on_ready=ready)
        else:
            await Supervisor(system, replicas=counts, host=host, out=sys.stdout).run(stop, on_ready=ready)

    handler = console_logging(system.settings.log.level)  # as the children of processes mode print theirs
    try:
        asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(handler)
    console.print("stopped.", style="dim")
