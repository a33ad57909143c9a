"""orders: takes an order and runs the checkout saga (payments.charge -> inventory.reserve -> shipping.schedule).

The saga records the order (pending), charges it, reserves its stock, schedules its shipment, then confirms it:
the confirmed row and the ``order.created`` message commit in one transaction (the transactional outbox), so the
message goes out if and only if the order is confirmed, even if the process dies right after the commit. When a
step fails, the steps before it are undone in reverse order (a reservation released, a charge refunded, the order
cancelled, with ``order.cancelled`` through the outbox too). Because recording and confirming are steps, a saga
that a crash interrupted and that the service recovers later ends with its order confirmed or cancelled too.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field

from meshkit import Service
from meshkit.errors import SagaFailed
from meshkit.saga import Saga, SagaContext, Step

service = Service("orders", version="1.0.0")
payments = service.client("payments")
inventory = service.client("inventory")
shipping = service.client("shipping")
outbox = service.outbox  # declared: its relay runs from the service's start
PRICES = {"book": 1_500, "pen": 200, "lamp": 4_900, "mug": 900}  # cents


@service.on_start
async def create_tables() -> None:
    await service.database.execute(
        "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT, email TEXT, sku TEXT,"
        " quantity BIGINT, total BIGINT, status TEXT, charge TEXT, shipment TEXT, reason TEXT)"
    )


# -- the checkout saga: each step is one local transaction, here or in another service, with its compensation -------
# The saga id (the order id) is every call's Idempotency-Key: a step re-run after a crash is answered, not repeated.


async def record(ctx: SagaContext) -> None:
    await service.database.execute(
        "INSERT INTO orders (id, customer, email, sku, quantity, total, status)"
        " SELECT ?, ?, ?, ?, ?, ?, 'pending' WHERE NOT EXISTS (SELECT 1 FROM orders WHERE id = ?)",
        ctx.saga_id,
        ctx.data["customer"],
        ctx.data["email"],
        ctx.data["sku"],
        ctx.data["quantity"],
        ctx.data["total"],
        ctx.saga_id,
    )


async def cancel(ctx: SagaContext) -> None:
    async with outbox.transaction() as tx:  # cancelled once, announced once, however often this runs
        if await tx.execute("UPDATE orders SET status = 'cancelled' WHERE id = ? AND status = 'pending'", ctx.saga_id):
            tx.publish("order.cancelled", {"id": ctx.saga_id}, key=ctx.saga_id)


async def charge(ctx: SagaContext) -> dict[str, Any]:
    body = {"customer": ctx.data["customer"], "amount": ctx.data["total"]}
    response = await payments.post("/charges", json=body, headers={"Idempotency-Key": ctx.saga_id})
    if response.status != 201:
        raise StepRefused(402, f"payment failed: {response.json().get('detail', response.status)}")
    return {"id": response.json()["id"]}


async def refund(ctx: SagaContext) -> None:
    (await payments.post(f"/charges/{ctx.results['charge']['id']}/refund")).raise_for_status()


async def reserve(ctx: SagaContext) -> dict[str, Any]:
    body = {"order": ctx.saga_id, "sku": ctx.data["sku"], "quantity": ctx.data["quantity"]}
    response = await inventory.post("/reservations", json=body)
    if response.status != 201:
        raise StepRefused(409, f"out of stock: {response.json().get('detail', response.status)}")
    return {"order": ctx.saga_id}


async def release(ctx: SagaContext) -> None:
    (await inventory.delete(f"/reservations/{ctx.saga_id}")).raise_for_status()


async def schedule(ctx: SagaContext) -> dict[str, Any]:
    body = {"sku": ctx.data["sku"], "quantity": ctx.data["quantity"]}
    response = await shipping.post("/shipments", json=body, headers={"Idempotency-Key": ctx.saga_id})
    response.raise_for_status()
    return {"id": response.json()["id"]}


async def confirm(ctx: SagaContext) -> None:
    charge_id, shipment_id = ctx.results["charge"]["id"], ctx.results["schedule"]["id"]
    async with outbox.transaction() as tx:  # the confirmation and its announcement commit together, once
        confirmed = await tx.execute(
            "UPDATE orders SET status = 'confirmed', charge = ?, shipment = ? WHERE id = ? AND status = 'pending'",
            charge_id,
            shipment_id,
            ctx.saga_id,
        )
        if confirmed:
            data = {k: ctx.data[k] for k in ("customer", "email", "sku", "quantity", "total")}
            tx.publish("order.created", {"id": ctx.saga_id, **data}, key=ctx.saga_id)


checkout = service.saga(
    Saga(
        "checkout",
        [
            Step("record", record, compensate=cancel),
            Step("charge", charge, compensate=refund),
            # a reservation whose answer was lost may have been made: release it too (releasing nothing is fine)
            Step("reserve", reserve, compensate=release, compensate_failed=True),
            Step("schedule", schedule),
            Step("confirm", confirm),
        ],
    )
)


class StepRefused(Exception):
    """A step's service said no (the saga compensates; the order's answer carries ``status``)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# -- the API -----------------------------------------------------------------------------------------------------


class OrderIn(BaseModel):
    customer: str
    email: str
    sku: str
    quantity: int = Field(ge=1, le=100)


@service.http.post("/orders", status_code=201)
async def create_order(order: OrderIn) -> dict[str, object]:
    if order.sku not in PRICES:
        raise HTTPException(404, f"unknown sku {order.sku!r}; we sell {', '.join(PRICES)}")
    order_id = uuid.uuid4().hex[:12]
    total = PRICES[order.sku] * order.quantity
    data = {**order.model_dump(), "total": total}
    try:
        done = await service.sagas.run(checkout, data, saga_id=order_id)
    except SagaFailed as failed:
        refused = failed.__cause__ if isinstance(failed.__cause__, StepRefused) else None
        await service.database.execute("UPDATE orders SET reason = ? WHERE id = ?", failed.reason, order_id)
        raise HTTPException(refused.status if refused else 502, refused.detail if refused else str(failed)) from None
    charge_id, shipment_id = done.results["charge"]["id"], done.results["schedule"]["id"]
    return {"id": order_id, "total": total, "charge": charge_id, "shipment": shipment_id, "status": "confirmed"}


@service.http.get("/orders/{order_id}")
async def get_order(order_id: str) -> dict[str, object]:
    row = await service.database.fetchone(
        "SELECT id, customer, sku, quantity, total, charge, shipment, status FROM orders WHERE id = ?", order_id
    )
    if row is None:
        raise HTTPException(404, "no such order")
    keys = ("id", "customer", "sku", "quantity", "total", "charge", "shipment", "status")
    return dict(zip(keys, row, strict=True))
