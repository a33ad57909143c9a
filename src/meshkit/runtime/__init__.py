"""The service runtime: a :class:`Service` owns its HTTP app, message handlers, clients, lifecycle and health.

::

    from meshkit import Service

    orders = Service("orders", version="1.0.0")
    payments = orders.client("payments")

    @orders.http.post("/orders")
    async def create(order: dict) -> dict:
        charge = await payments.post("/charges", json={"amount": order["total"]})
        await orders.publish("order.created", {"id": order["id"]}, key=order["id"])
        return {"charge": charge.json()}

    @orders.subscribe("payment.refunded")
    async def on_refund(message) -> None: ...

``meshkit run FOLDER`` starts the services a ``meshkit.toml`` lists, in one process or one process each
(:mod:`meshkit.runner`); docs/runtime.md has the details.
"""

from meshkit.runtime.service import Downstream, RunContext, Service

__all__ = ["Downstream", "RunContext", "Service"]
