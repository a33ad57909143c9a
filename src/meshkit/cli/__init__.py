"""The ``meshkit`` command: thin (no logic of its own), typer + rich.

Every command group is a module of this package exposing a ``typer.Typer`` (or a command function), registered in
:data:`GROUPS`. :func:`main` owns error handling: a :class:`~meshkit.errors.MeshkitError` prints ``error: ...`` and
``hint: ...`` (exit 2 for configuration errors, 1 otherwise); anything unexpected prints one line and a hint to
rerun with ``MESHKIT_DEBUG=1``, which shows the traceback. Never a traceback of our internals by default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.console import Console

from meshkit import __version__
from meshkit.cli import config, dlq
from meshkit.errors import ConfigurationError, MeshkitError

__all__ = ["app", "main"]

app = typer.Typer(
    name="meshkit",
    help="meshkit: the microservice patterns, for real.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# (command name, the module's typer app or command): add a group here and it appears in `meshkit --help`.
app.command(name="config", help=config.__doc__)(config.show)
app.add_typer(dlq.app, name="dlq")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"meshkit {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """meshkit: the microservice patterns, for real."""


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script's entry point.

    Typer runs in standalone mode, so usage errors, ``--version`` and Ctrl-C keep its own handling; what escapes
    it is ours to report.
    """
    try:
        app(args=list(argv) if argv is not None else None, prog_name="meshkit")
    except MeshkitError as exc:
        err = _stderr()
        err.print(f"[red]error:[/] {exc.message}", markup=True, emoji=False)
        if exc.hint:
            err.print(f"[cyan]hint:[/] {exc.hint}", markup=True, emoji=False)
        sys.exit(2 if isinstance(exc, ConfigurationError) else 1)
    except Exception as exc:
        if os.environ.get("MESHKIT_DEBUG"):
            raise
        err = _stderr()
        err.print(f"[red]error:[/] internal error: {type(exc).__name__}: {exc}", markup=True, emoji=False)
        err.print("[cyan]hint:[/] rerun with MESHKIT_DEBUG=1 to see the traceback, and report it", markup=True)
        sys.exit(1)
