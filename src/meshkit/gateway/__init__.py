"""meshkit's API gateway: a protocol-level HTTP/1.1 proxy (HTTP/2 for clients over TLS) with routes, discovery,
resilience and plugins.

``meshkit gateway --config gateway.yaml`` runs one; ``meshkit run`` puts one in front of a system's services when
its ``meshkit.toml`` names a gateway config. In code::

    from meshkit.gateway import Gateway, load_config

    async with Gateway(load_config("gateway.yaml"), registry=registry) as gateway:
        ...                                   # gateway.port, gateway.admin_port

docs/gateway.md is the reference: config, plugins, BFF routes, admin API, hardening, benchmarks.
"""

from meshkit.gateway.app import Gateway, PluginStats, builtin_plugins
from meshkit.gateway.config import GatewayConfig, LoadedConfig, load_config, parse_config
from meshkit.gateway.plugin import Headers, Plugin, PluginContext, ProxyRequest, Reply, ResponseHead

__all__ = [
    "Gateway",
    "GatewayConfig",
    "Headers",
    "LoadedConfig",
    "Plugin",
    "PluginContext",
    "PluginStats",
    "ProxyRequest",
    "Reply",
    "ResponseHead",
    "builtin_plugins",
    "load_config",
    "parse_config",
]
