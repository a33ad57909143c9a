"""inventory: stock per sku. The checkout saga reserves stock (and releases it when a later step fails); each
``order.created`` then commits its order's reservation (once, however often the message arrives)."""

from __future__ import annotations

from fastapi import HTTPException
from pydantic import BaseModel, Field

from meshkit import Service
from meshkit.messaging import Message
from shop.store import Store

service = Service("inventory", version="1.0.0")
store = Store(
    "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, quantity INT);"
    "CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, sku TEXT, quantity INT, state TEXT);"
    "INSERT OR IGNORE INTO stock VALUES ('book', 100), ('pen', 1000), ('lamp', 20), ('mug', 3);"
).attach(service, "inventory.db")


class Reservation(BaseModel):
    order: str
    sku: str
    quantity: int = Field(ge=1)


@service.http.post("/reservations", status_code=201)
async def reserve(body: Reservation) -> dict[str, object]:
    """Take ``quantity`` off the stock for ``order`` (asking again for the same order changes nothing)."""
    taken = await store.transaction(
        [
            # only when this order holds no reservation yet and the stock suffices
            (
                "UPDATE stock SET quantity = quantity - ? WHERE sku = ? AND quantity >= ?"
                " AND NOT EXISTS (SELECT 1 FROM reservations WHERE order_id = ?)",
                (body.quantity, body.sku, body.quantity, body.order),
            ),
            (
                "INSERT INTO reservations SELECT ?, ?, ?, 'held' WHERE changes() = 1",
                (body.order, body.sku, body.quantity),
            ),
        ]
    )
    existing = await store.run("SELECT state FROM reservations WHERE order_id = ?", (body.order,))
    if not taken and not existing:
        rows = await store.run("SELECT quantity FROM stock WHERE sku = ?", (body.sku,))
        left = rows[0][0] if rows else 0
        raise HTTPException(409, f"{body.quantity} x {body.sku} asked, {left} in stock")
    return {"order": body.order, "sku": body.sku, "quantity": body.quantity}


@service.http.delete("/reservations/{order_id}")
async def release(order_id: str) -> dict[str, object]:
    """Give a held reservation's stock back (a compensation: releasing twice, or nothing, is fine)."""
    await store.transaction(
        [
            (
                "UPDATE stock SET quantity = quantity + (SELECT quantity FROM reservations"
                " WHERE order_id = ? AND state = 'held') WHERE sku = (SELECT sku FROM reservations"
                " WHERE order_id = ? AND state = 'held')",
                (order_id, order_id),
            ),
            ("UPDATE reservations SET state = 'released' WHERE order_id = ? AND state = 'held'", (order_id,)),
        ]
    )
    return {"order": order_id, "state": "released"}


@service.subscribe("order.created")
async def commit_reservation(message: Message) -> None:
    # at-least-once delivery: committing a committed reservation changes nothing
    await store.run("UPDATE reservations SET state = 'committed' WHERE order_id = ?", (message.data["id"],))


@service.http.get("/stock/{sku}")
async def stock(sku: str) -> dict[str, object]:
    rows = await store.run("SELECT quantity FROM stock WHERE sku = ?", (sku,))
    if not rows:
        raise HTTPException(404, f"unknown sku {sku!r}")
    return {"sku": sku, "quantity": rows[0][0]}


@service.http.get("/reservations/{order_id}")
async def reservation(order_id: str) -> dict[str, object]:
    rows = await store.run("SELECT sku, quantity, state FROM reservations WHERE order_id = ?", (order_id,))
    if not rows:
        raise HTTPException(404, "no such reservation")
    return {"order": order_id, "sku": rows[0][0], "quantity": rows[0][1], "state": rows[0][2]}
