"""orders: takes an order, charges it (payments), ships it (shipping), and announces ``order.created``."""

from __future__ import annotations

import uuid

from fastapi import HTTPException
from pydantic import BaseModel, Field

from meshkit import Service
from shop.store import Store

service = Service("orders", version="1.0.0")
payments = service.client("payments")
shipping = service.client("shipping")
store = Store(
    "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT, email TEXT, sku TEXT, quantity INT,"
    " total INT, charge TEXT, shipment TEXT)"
).attach(service, "orders.db")
PRICES = {"book": 1_500, "pen": 200, "lamp": 4_900}  # cents


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
    # the Idempotency-Key makes these POSTs safe to retry on another instance (the client does, they dedup)
    charge = await payments.post(
        "/charges", json={"customer": order.customer, "amount": total}, headers={"Idempotency-Key": order_id}
    )
    if charge.status != 201:
        raise HTTPException(402, f"payment failed: {charge.json().get('detail', charge.status)}")
    shipment = await shipping.post(
        "/shipments", json={"sku": order.sku, "quantity": order.quantity}, headers={"Idempotency-Key": order_id}
    )
    shipment.raise_for_status()
    await store.run(
        "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            order_id,
            order.customer,
            order.email,
            order.sku,
            order.quantity,
            total,
            charge.json()["id"],
            shipment.json()["id"],
        ),
    )
    await service.publish(
        "order.created",
        {
            "id": order_id,
            "customer": order.customer,
            "email": order.email,
            "sku": order.sku,
            "quantity": order.quantity,
            "total": total,
        },
        key=order_id,
    )
    return {"id": order_id, "total": total, "charge": charge.json()["id"], "shipment": shipment.json()["id"]}


@service.http.get("/orders/{order_id}")
async def get_order(order_id: str) -> dict[str, object]:
    rows = await store.run(
        "SELECT id, customer, sku, quantity, total, charge, shipment FROM orders WHERE id = ?", (order_id,)
    )
    if not rows:
        raise HTTPException(404, "no such order")
    keys = ("id", "customer", "sku", "quantity", "total", "charge", "shipment")
    return dict(zip(keys, rows[0], strict=True))
