"""The public surface: what ``__all__`` promises is importable, and importing meshkit does no work."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import meshkit

PUBLIC_MODULES = [
    "meshkit",
    "meshkit.errors",
    "meshkit.resilience",
    "meshkit.testing",
    "meshkit.messaging",
    "meshkit.discovery",
    "meshkit.client",
    "meshkit.outbox",
    "meshkit.saga",
    "meshkit.eventsourcing",
    "meshkit.projections",
    "meshkit.runtime",
    "meshkit.runner",
    "meshkit.gateway",
    "meshkit.dashboard",
    "meshkit.tracing",
    "meshkit.tracing.spans",
    "meshkit.tracing.export",
    "meshkit.tracing.collector",
    "meshkit.tracing.receiver",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_are_importable_and_unique(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    # (their order is ruff's to check: RUF022 sorts every __all__)
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing


def test_every_public_class_defined_in_errors_and_resilience_is_exported() -> None:
    for name in ("meshkit.errors", "meshkit.resilience"):
        module = importlib.import_module(name)
        public = {
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and isinstance(v, type) and v.__module__.startswith(name)
        }
        assert public <= set(module.__all__), f"{name} does not export {sorted(public - set(module.__all__))}"


def test_version_is_a_release_string() -> None:
    parts = meshkit.__version__.split(".")
    assert len(parts) == 3
    assert all(p.isdigit() for p in parts)


def test_importing_meshkit_does_no_work() -> None:
    code = (
        "import logging, threading, sys\n"
        "before = threading.active_count(); handlers = list(logging.getLogger().handlers)\n"
        "import meshkit, meshkit.resilience, meshkit.testing, meshkit.errors\n"
        "assert threading.active_count() == before, 'import started a thread'\n"
        "assert logging.getLogger().handlers == handlers, 'import configured logging'\n"
        "heavy = [m for m in ('aiohttp', 'redis', 'opentelemetry', 'pydantic', 'typer') if m in sys.modules]\n"
        "assert not heavy, f'import pulled in {heavy}'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
