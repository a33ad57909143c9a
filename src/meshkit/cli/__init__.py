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
from rich.markup import escape

from meshkit import __version__
from meshkit.cli import config, dlq, gateway, run
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
app.add_typer(gateway.app, name="gateway")
app.command(name="run", help=run.__doc__)(run.run)


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
    """The console script's entry point: every failure ends as ``error: ...`` (and ``hint: ...``), never a traceback.

    Typer runs with ``standalone_mode=False`` so that usage errors come here too and read like the rest.
    """
    err = _stderr()
    try:
        code = app(args=list(argv) if argv is not None else None, prog_name="meshkit", standalone_mode=False)
    except KeyboardInterrupt:
        err.print("[red]error:[/] interrupted", markup=True)
        sys.exit(130)
    except MeshkitError as exc:
        err.print(f"[red]error:[/] {escape(exc.message)}", markup=True, emoji=False)
        if exc.hint:
            err.print(f"[cyan]hint:[/] {escape(exc.hint)}", markup=True, emoji=False)
        sys.exit(2 if isinstance(exc, ConfigurationError) else 1)
    except Exception as exc:
        usage = _usage_error(exc)
        if usage is not None:
            message, hint, exit_code = usage
            err.print(f"[red]error:[/] {escape(message)}", markup=True, emoji=False, highlight=False)
            if hint:
                err.print(f"[cyan]hint:[/] {escape(hint)}", markup=True, emoji=False, highlight=False)
            sys.exit(exit_code)
        if os.environ.get("MESHKIT_DEBUG"):
            raise
        err.print(f"[red]error:[/] internal error: {type(exc).__name__}: {escape(str(exc))}", markup=True, emoji=False)
        err.print("[cyan]hint:[/] rerun with MESHKIT_DEBUG=1 to see the traceback, and report it", markup=True)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


def _usage_error(exc: Exception) -> tuple[str, str | None, int] | None:
    """``(message, hint, exit code)`` if ``exc`` is the command line's own failure (a usage error, an abort).

    Typer ships its own copy of click, so its exceptions are recognised by shape, not by class.
    """
    kind = type(exc).__name__
    if kind == "Abort":
        return "interrupted", None, 130
    format_message = getattr(exc, "format_message", None)
    exit_code = getattr(exc, "exit_code", None)
    if not callable(format_message) or not isinstance(exit_code, int):
        return None
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "meshkit"
    hint = f"see '{where} --help'" if exit_code == 2 else None
    return str(format_message()), hint, exit_code
