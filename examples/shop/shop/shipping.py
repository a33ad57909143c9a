"""shipping: schedules shipments for paid orders."""

from __future__ import annotations

import uuid

from fastapi import Header, HTTPException
from pydantic import BaseModel, Field

from meshkit import Service
from shop.store import Store

service = Service("shipping", version="1.0.0")
store = Store(
    "CREATE TABLE IF NOT EXISTS shipments (id TEXT PRIMARY KEY, idem TEXT UNIQUE, sku TEXT, quantity INT)"
).attach(service, "shipping.db")


class Shipment(BaseModel):
    sku: str
    quantity: int = Field(ge=1)


@service.http.post("/shipments", status_code=201)
async def schedule(body: Shipment, idempotency_key: str | None = Header(default=None)) -> dict[str, object]:
    if idempotency_key:
        rows = await store.run("SELECT id FROM shipments WHERE idem = ?", (idempotency_key,))
        if rows:
            return {"id": rows[0][0], "sku": body.sku, "quantity": body.quantity}
    shipment_id = uuid.uuid4().hex[:12]
    await store.run(
        "INSERT INTO shipments (id, idem, sku, quantity) VALUES (?, ?, ?, ?)",
        (shipment_id, idempotency_key, body.sku, body.quantity),
    )
    return {"id": shipment_id, "sku": body.sku, "quantity": body.quantity}


@service.http.get("/shipments/{shipment_id}")
async def get_shipment(shipment_id: str) -> dict[str, object]:
    rows = await store.run("SELECT id, sku, quantity FROM shipments WHERE id = ?", (shipment_id,))
    if not rows:
        raise HTTPException(404, "no such shipment")
    return {"id": rows[0][0], "sku": rows[0][1], "quantity": rows[0][2]}
