from __future__ import annotations

import pytest

from meshkit import errors
from meshkit._core.optional import require


def test_the_tree_is_grouped_by_what_callers_do() -> None:
    assert issubclass(errors.CircuitOpen, errors.Unavailable)
    assert issubclass(errors.BulkheadFull, errors.Rejected)
    assert issubclass(errors.RateLimited, errors.Rejected)
    assert issubclass(errors.SettingsError, errors.ConfigurationError)
    assert issubclass(errors.MissingDependency, errors.ConfigurationError)
    assert issubclass(errors.TimeoutExceeded, TimeoutError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.MeshkitError)
        assert name in (errors.__doc__ or ""), f"{name} is missing from the tree drawn in the docstring"


def test_errors_that_prove_nothing_was_sent() -> None:
    assert errors.CircuitOpen("x").request_sent is False
    assert errors.RateLimited("x", retry_after=1).request_sent is False
    assert errors.BulkheadFull("x", max_concurrent=1, max_wait=0).request_sent is False
    assert errors.Unavailable("x").request_sent is True


def test_messages_say_what_happened() -> None:
    assert str(errors.CircuitOpen("payments", retry_after=3.0)) == "circuit 'payments' is open: failing fast"
    assert errors.CircuitOpen("payments", retry_after=3.0).retry_after == 3.0
    assert "2 in flight" in str(errors.BulkheadFull("db", max_concurrent=2, max_wait=0.5))
    e = errors.SettingsError("unknown key", key="brokr", source="meshkit.toml:3", hint="did you mean 'broker'?")
    assert (e.key, e.source, e.hint) == ("brokr", "meshkit.toml:3", "did you mean 'broker'?")


def test_a_missing_optional_driver_names_the_extra() -> None:
    with pytest.raises(errors.MissingDependency) as info:
        require("surely_not_an_installed_module_xyz", "redis")
    assert "pip install 'meshkit[redis]'" in str(info.value)
    assert info.value.hint == "pip install 'meshkit[redis]'"
    assert isinstance(info.value.__cause__, ImportError)
    assert require("json", "none").dumps([1]) == "[1]"
