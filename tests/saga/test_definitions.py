"""Saga definitions: bad ones fail early with a clear ConfigurationError, and the public surface is what it says."""

from __future__ import annotations

import functools
from typing import Any

import pytest

import meshkit.saga
from meshkit.errors import ConfigurationError
from meshkit.saga import Saga, SagaContext, SagaRecord, Sagas, Step, StepLog


async def act(ctx: SagaContext) -> None:
    return None


def sync_act(ctx: SagaContext) -> None:
    return None


class AsyncCallable:
    async def __call__(self, ctx: SagaContext) -> str:
        return "ok"


async def act_with(ctx: SagaContext, value: int) -> int:
    return value


def unchecked(value: Any) -> Any:
    """A wrong value the type checker would catch (callers may not be type-checked)."""
    return value


def test_good_definitions() -> None:
    saga = Saga(
        "checkout.v2",
        [
            Step("charge", act, compensate=act),
            Step("reserve-stock", AsyncCallable(), compensate=functools.partial(act_with, value=1)),
            Step("ship_1", functools.partial(act_with, value=2), retry=3),
        ],
    )
    assert saga.name == "checkout.v2"
    assert [s.name for s in saga.steps] == ["charge", "reserve-stock", "ship_1"]
    assert saga.step("ship_1").retry == 3
    with pytest.raises(KeyError):
        saga.step("nope")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Saga("empty", []), "has no steps"),
        (lambda: Saga("dup", [Step("a", act), Step("a", act)]), "two steps named 'a'"),
        (lambda: Saga("", [Step("a", act)]), "bad saga name"),
        (lambda: Saga("has space", [Step("a", act)]), "bad saga name"),
        (lambda: Saga("x" * 101, [Step("a", act)]), "bad saga name"),
        (lambda: Saga(unchecked(42), [Step("a", act)]), "bad saga name"),
        (lambda: Saga("one", unchecked(Step("a", act))), "must be a list of Step"),
        (lambda: Saga("strs", unchecked(["a"])), "is not a Step"),
        (lambda: Step("a", unchecked(sync_act)), "action of step 'a' must be an async function"),
        (lambda: Step("a", act, compensate=unchecked(sync_act)), "compensation of step 'a' must be an async function"),
        (lambda: Step("a b", act), "bad step name"),
        (lambda: Step("a", act, retry=-1), "retry of step 'a'"),
        (lambda: Step("a", act, retry=True), "retry of step 'a'"),
    ],
)
def test_bad_definitions_are_configuration_errors(make: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make()


def test_bad_sagas_settings_and_registrations() -> None:
    database: Any = object()  # never used: these fail before any I/O
    with pytest.raises(ConfigurationError, match="owner"):
        Sagas(database, owner="")
    with pytest.raises(ConfigurationError, match="stale_after"):
        Sagas(database, owner="o", stale_after=0)
    with pytest.raises(ConfigurationError, match="recover_interval"):
        Sagas(database, owner="o", recover_interval=-1)
    with pytest.raises(ConfigurationError, match="compensation_attempts"):
        Sagas(database, owner="o", compensation_attempts=0)
    sagas = Sagas(database, owner="o")
    saga = Saga("checkout", [Step("a", act)])
    assert sagas.register(saga) is saga
    sagas.register(Saga("checkout", [Step("a", act)]))  # an equal definition again: fine
    with pytest.raises(ConfigurationError, match="already registered"):
        sagas.register(Saga("checkout", [Step("b", act)]))
    with pytest.raises(ConfigurationError, match="takes a Saga"):
        sagas.register("checkout")  # type: ignore[arg-type]
    assert list(sagas.sagas) == ["checkout"]


def test_the_public_surface() -> None:
    exported = meshkit.saga.__all__
    assert exported == sorted(exported)
    assert all(hasattr(meshkit.saga, name) for name in exported)
    assert {"Saga", "SagaContext", "SagaRecord", "Sagas", "Step"} <= set(exported)
    record = SagaRecord(
        "i", "n", "o", "completed", {}, {}, None, None, 1.0, 2.0, [StepLog("a", "action", "done", None, 1.0, 1.5)]
    )
    with pytest.raises(AttributeError):
        record.status = "failed"  # type: ignore[misc]
    assert record.to_dict()["steps"] == [
        {"step": "a", "phase": "action", "status": "done", "error": None, "started": 1.0, "ended": 1.5, "attempt": 1}
    ]
