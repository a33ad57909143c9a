"""inventory: stock per sku; each ``order.created`` takes its quantity off (once, however often it arrives)."""

from __future__ import annotations

from fastapi import HTTPException

from meshkit import Service
from meshkit.messaging import Message
from shop.store import Store

service = Service("inventory", version="1.0.0")
store = Store(
    "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, quantity INT);"
    "CREATE TABLE IF NOT EXISTS applied (order_id TEXT PRIMARY KEY);"
    "INSERT OR IGNORE INTO stock VALUES ('book', 100), ('pen', 1000), ('lamp', 20);"
).attach(service, "inventory.db")


@service.subscribe("order.created")
async def take_stock(message: Message) -> None:
    order = message.data
    # at-least-once delivery: remember which orders were applied, so a redelivery changes nothing
    if await store.run("INSERT OR IGNORE INTO applied VALUES (?) RETURNING order_id", (order["id"],)):
        await store.run("UPDATE stock SET quantity = quantity - ? WHERE sku = ?", (order["quantity"], order["sku"]))


@service.http.get("/stock/{sku}")
async def stock(sku: str) -> dict[str, object]:
    rows = await store.run("SELECT quantity FROM stock WHERE sku = ?", (sku,))
    if not rows:
        raise HTTPException(404, f"unknown sku {sku!r}")
    return {"sku": sku, "quantity": rows[0][0]}
