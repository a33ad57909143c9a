"""The gateway in front of a system: started by ``meshkit run`` when ``meshkit.toml`` has a ``[gateway]`` section.

It starts once the services are ready (its routes resolve them through the system's registry) and stops first
(new requests stop arriving before the services leave). For a gateway whose ``jwt`` plugin uses an HMAC
``secret`` (a development setup such as the shop's), :func:`dev_token` mints a token it accepts, so the ready
output can show a working ``curl``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from meshkit.discovery import Registry
from meshkit.gateway import Gateway, LoadedConfig, load_config
from meshkit.gateway.config import iter_plugins
from meshkit.runner.system import System

__all__ = ["dev_token", "front_gateway"]


def gateway_config(system: System) -> LoadedConfig | None:
    """The system's gateway config (``None`` when it has none), with ``[gateway] port`` applied."""
    entry = system.settings.gateway
    if entry is None:
        return None
    loaded = load_config(system.folder / entry.config)
    if entry.port is not None:
        config = loaded.config
        listen = config.listen.model_copy(update={"port": entry.port})
        loaded = replace(loaded, config=config.model_copy(update={"listen": listen}))
    return loaded


@contextlib.asynccontextmanager
async def front_gateway(system: System, registry: Registry, tracer: Any = None) -> AsyncIterator[Gateway | None]:
    """Run the system's gateway (if it has one) on ``registry`` for the duration of the block (``tracer``: a span
    per request)."""
    loaded = gateway_config(system)
    entry = system.settings.gateway
    if loaded is None or entry is None:
        yield None
        return
    gateway = Gateway(loaded, registry=registry, path=system.folder / entry.config, tracer=tracer)
    await gateway.start(watch=True)
    try:
        yield gateway
    finally:
        await gateway.aclose(grace=5.0)


def dev_token(loaded: LoadedConfig, subject: str = "ada", lifetime: float = 3600.0) -> str | None:
    """A token the gateway's first HMAC ``jwt`` plugin accepts (``None`` if it has none), valid ``lifetime``
    seconds, with every scope the routes ask for. For development: anyone with the secret can mint these."""
    import jwt  # noqa: PLC0415 - PyJWT comes with the gateway extra

    config = loaded.config
    lists = [config.plugins, *(r.plugins for r in config.routes), *(b.plugins for b in config.bff)]
    found: dict[str, Any] | None = None
    scopes: set[str] = set()
    for items in lists:
        for _, name, options in iter_plugins(items):
            if name != "jwt" or not options:
                continue
            scopes.update(options.get("scopes") or ())
            if found is None and (options.get("secret") or options.get("secret_env")):
                found = options
    if found is None:
        return None
    secret = found.get("secret") or os.environ.get(str(found.get("secret_env")), "")
    if not secret:
        return None
    algorithm = next((a for a in found.get("algorithms", []) if str(a).startswith("HS")), "HS256")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(lifetime)}
    if found.get("issuer"):
        claims["iss"] = found["issuer"]
    audience = found.get("audience")
    if audience:
        claims["aud"] = audience if isinstance(audience, str) else audience[0]
    if scopes:
        claims["scope"] = " ".join(sorted(scopes))
    return str(jwt.encode(claims, secret, algorithm=algorithm))
