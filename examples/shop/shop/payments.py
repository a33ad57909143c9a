"""payments: charges a customer. A retried charge (same Idempotency-Key) is answered, not charged twice."""

from __future__ import annotations

import uuid

from fastapi import Header, HTTPException
from pydantic import BaseModel, Field

from meshkit import Service
from shop.store import Store

service = Service("payments", version="1.0.0")
store = Store(
    "CREATE TABLE IF NOT EXISTS charges (id TEXT PRIMARY KEY, idem TEXT UNIQUE, customer TEXT, amount INT);"
    "CREATE TABLE IF NOT EXISTS refunds (charge_id TEXT PRIMARY KEY);"
).attach(service, "payments.db")
LIMIT = 10_000  # cents: larger charges are declined


class Charge(BaseModel):
    customer: str
    amount: int = Field(gt=0)


@service.http.post("/charges", status_code=201)
async def charge(body: Charge, idempotency_key: str | None = Header(default=None)) -> dict[str, object]:
    if idempotency_key:
        rows = await store.run("SELECT id, amount FROM charges WHERE idem = ?", (idempotency_key,))
        if rows:
            return {"id": rows[0][0], "amount": rows[0][1], "customer": body.customer}
    if body.amount > LIMIT:
        raise HTTPException(402, f"declined: {body.amount} is over the limit of {LIMIT}")
    charge_id = uuid.uuid4().hex[:12]
    await store.run(
        "INSERT INTO charges (id, idem, customer, amount) VALUES (?, ?, ?, ?)",
        (charge_id, idempotency_key, body.customer, body.amount),
    )
    return {"id": charge_id, "amount": body.amount, "customer": body.customer}


@service.http.post("/charges/{charge_id}/refund")
async def refund(charge_id: str) -> dict[str, object]:
    """Give a charge back (the checkout saga's compensation): refunding twice refunds once."""
    rows = await store.run("SELECT amount FROM charges WHERE id = ?", (charge_id,))
    if not rows:
        raise HTTPException(404, "no such charge")
    await store.run("INSERT OR IGNORE INTO refunds VALUES (?)", (charge_id,))
    return {"id": charge_id, "refunded": rows[0][0]}


@service.http.get("/charges/{charge_id}")
async def get_charge(charge_id: str) -> dict[str, object]:
    rows = await store.run(
        "SELECT id, customer, amount, EXISTS (SELECT 1 FROM refunds WHERE charge_id = id) FROM charges WHERE id = ?",
        (charge_id,),
    )
    if not rows:
        raise HTTPException(404, "no such charge")
    return {"id": rows[0][0], "customer": rows[0][1], "amount": rows[0][2], "refunded": bool(rows[0][3])}
