"""CQRS projections: read models built from the event store's global log, exactly once, each with a checkpoint.

::

    projector = Projector(store, database, tracer=tracer)
    projector.add(Projection("account_balances", balances, schema={"sqlite": ddl, "postgresql": ddl}))
    await projector.start()
    await projector.wait_caught_up()
    print([s.to_dict() for s in await projector.status()])
    await projector.aclose()

docs/eventsourcing.md has the details.
"""

from meshkit.projections.projection import Handler, Projection, ProjectionStatus, Reset
from meshkit.projections.projector import CHECKPOINTS, Projector, read_status

__all__ = ["CHECKPOINTS", "Handler", "Projection", "ProjectionStatus", "Projector", "Reset", "read_status"]
