"""Calling other services: client-side discovery, load balancing, resilience and trace propagation.

::

    async with meshkit.discovery.connect("sqlite:///registry.db") as registry:
        async with ServiceClient("payments", registry) as payments:
            response = await payments.post("/charges", json={"order": 7, "cents": 1250})
            charge = response.raise_for_status().json()

Every call resolves a healthy instance of the service from the registry (kept current by a watch), chooses one
with the balancer (power of two choices by default, honouring the ``weight`` metadata), and goes through the
resilience policies: a timeout per attempt, retries on another instance for calls that are safe to repeat, a
circuit breaker per instance and one per service, a bulkhead per service and passive outlier ejection. Every
request carries the caller's ``traceparent``. :class:`HttpTransport` sends requests over pooled HTTP connections;
:class:`AsgiTransport` calls the services' ASGI apps in process (the monolith run mode). docs/client.md has the
details.
"""

from meshkit.client._client import IDEMPOTENT_METHODS, QueryParams, ServiceClient
from meshkit.client.asgi import ASGIApp, AsgiTransport
from meshkit.client.balancers import Balancer, LeastOutstanding, PowerOfTwo, Random, RoundRobin, weight
from meshkit.client.base import Headers, HeadersLike, Request, Response, Transport
from meshkit.client.http import HttpTransport
from meshkit.client.options import BreakerFactory, ClientOptions, default_breaker, default_retry

__all__ = [
    "IDEMPOTENT_METHODS",
    "ASGIApp",
    "AsgiTransport",
    "Balancer",
    "BreakerFactory",
    "ClientOptions",
    "Headers",
    "HeadersLike",
    "HttpTransport",
    "LeastOutstanding",
    "PowerOfTwo",
    "QueryParams",
    "Random",
    "Request",
    "Response",
    "RoundRobin",
    "ServiceClient",
    "Transport",
    "default_breaker",
    "default_retry",
    "weight",
]
