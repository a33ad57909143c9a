"""email: sends (records) a confirmation for every ``order.created``."""

from __future__ import annotations

from meshkit import Service
from meshkit.messaging import Message
from shop.store import Store

service = Service("email", version="1.0.0")
store = Store("CREATE TABLE IF NOT EXISTS sent (order_id TEXT PRIMARY KEY, address TEXT, subject TEXT)").attach(
    service, "email.db"
)


@service.subscribe("order.created")
async def confirm(message: Message) -> None:
    order = message.data
    if "@" not in order["email"]:
        # retried a few times, then the message goes to order.created's dead letter topic (see the dashboard)
        raise ValueError(f"cannot send to {order['email']!r}: not an email address")
    subject = f"Your order {order['id']}: {order['quantity']} x {order['sku']}"
    await store.run("INSERT OR IGNORE INTO sent VALUES (?, ?, ?)", (order["id"], order["email"], subject))


@service.http.get("/sent")
async def sent() -> list[dict[str, str]]:
    rows = await store.run("SELECT order_id, address, subject FROM sent ORDER BY rowid")
    return [{"order": r[0], "to": r[1], "subject": r[2]} for r in rows]
