"""Guarded imports of optional drivers: a missing one names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from meshkit.errors import MissingDependency

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`~meshkit.errors.MissingDependency` naming ``meshkit[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module, extra) from exc
