"""Orchestrated sagas with compensation: one transaction's worth of work spread over several services, undone
step by step when a later step fails.

::

    checkout = Saga("checkout", [
        Step("charge", charge, compensate=refund),
        Step("reserve", reserve, compensate=release),
        Step("schedule", schedule),
    ])
    sagas = Sagas(database, owner="orders", tracer=tracer)
    sagas.register(checkout)
    await sagas.start()                       # tables, then recovery of sagas a crash left unfinished
    record = await sagas.run(checkout, {"order": "o-1", "amount": 42})    # or SagaFailed after compensating
    await sagas.aclose()

Each step's start and outcome are written to the database before and after it runs, so a crash leaves a record
that :meth:`Sagas.start` (and every ``recover_interval`` after) continues in another process of the same owner: a
saga that was running re-runs the step that was in flight, one that was compensating goes on compensating. Steps
must therefore be idempotent; ``ctx.saga_id`` is the idempotency key to give the services they call. See
``docs/sagas.md``.
"""

from meshkit.saga._definition import Saga, SagaContext, Step
from meshkit.saga._orchestrator import Sagas
from meshkit.saga._record import SagaRecord, StepLog

__all__ = ["Saga", "SagaContext", "SagaRecord", "Sagas", "Step", "StepLog"]
