"""What the database remembers of a saga: :class:`SagaRecord` and its step log (:class:`StepLog`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ACTIVE", "FINISHED", "Phase", "SagaRecord", "SagaStatus", "StepLog", "StepStatus"]

SagaStatus = Literal["running", "compensating", "completed", "compensated", "failed"]
Phase = Literal["action", "compensation"]
StepStatus = Literal["running", "done", "failed"]

#: Statuses of a saga that is not finished: a crash leaves it so, and recovery continues it.
ACTIVE: tuple[SagaStatus, ...] = ("running", "compensating")
#: Statuses of a finished saga. ``failed`` means a compensation failed too: a person must look.
FINISHED: tuple[SagaStatus, ...] = ("completed", "compensated", "failed")


@dataclass(frozen=True, slots=True)
class StepLog:
    """One attempt at an action or a compensation: written ``running`` before it starts, then ``done`` or
    ``failed`` (an attempt interrupted by a crash is marked ``failed`` when the saga is recovered)."""

    step: str
    phase: Phase
    status: StepStatus
    error: str | None
    started: float  # Unix seconds
    ended: float | None
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "phase": self.phase,
            "status": self.status,
            "error": self.error,
            "started": self.started,
            "ended": self.ended,
            "attempt": self.attempt,
        }


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """A saga as stored: its input, the results of its steps, where it stands and its step log (oldest first).

    ``failed_step`` is the step whose action failed (None while nothing failed); ``error`` says why, and, when the
    status is ``failed``, which compensation failed too. Times are Unix seconds.
    """

    id: str
    name: str
    owner: str
    status: SagaStatus
    data: dict[str, Any]
    results: dict[str, Any]
    error: str | None
    failed_step: str | None
    created: float
    updated: float
    steps: list[StepLog] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able values (for the dashboard and APIs)."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "status": self.status,
            "data": self.data,
            "results": self.results,
            "error": self.error,
            "failed_step": self.failed_step,
            "created": self.created,
            "updated": self.updated,
            "steps": [entry.to_dict() for entry in self.steps],
        }
