"""analytics: counts orders and revenue per sku from ``order.created``."""

from __future__ import annotations

from meshkit import Service
from meshkit.messaging import Message
from shop.store import Store

service = Service("analytics", version="1.0.0")
store = Store("CREATE TABLE IF NOT EXISTS seen (order_id TEXT PRIMARY KEY, sku TEXT, quantity INT, total INT)").attach(
    service, "analytics.db"
)


@service.subscribe("order.created")
async def count(message: Message) -> None:
    o = message.data
    await store.run("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", (o["id"], o["sku"], o["quantity"], o["total"]))


@service.http.get("/stats")
async def stats() -> dict[str, object]:
    rows = await store.run("SELECT sku, COUNT(*), SUM(quantity), SUM(total) FROM seen GROUP BY sku ORDER BY sku")
    return {
        "orders": sum(r[1] for r in rows),
        "by_sku": {r[0]: {"orders": r[1], "quantity": r[2], "revenue": r[3]} for r in rows},
    }
