"""OTLP span exporters: where a service's spans go when they leave the process.

Two OTLP protocols, as every OpenTelemetry collector, Jaeger and Tempo speak them:

- ``"http/protobuf"`` (the default, port 4318 by convention): ``endpoint`` is the traces URL,
  ``http(s)://host:4318/v1/traces``. A URL with no path gets ``/v1/traces``, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` does.
- ``"grpc"`` (port 4317): ``endpoint`` is ``http://host:4317`` (plaintext), ``https://host:4317`` (TLS) or
  ``host:4317`` (TLS, unless ``OTEL_EXPORTER_OTLP_INSECURE=true``: the OpenTelemetry exporter's rule). gRPC calls
  the collector's trace service: the endpoint has no path.

:func:`otlp_exporter` checks the endpoint against the protocol before anything is sent (a mistake is a
:class:`~meshkit.errors.ConfigurationError` with a hint, not spans lost later in the exporter's thread) and builds
the OpenTelemetry SDK's exporter, imported on first use so ``import meshkit`` stays cheap. Pass it to
:func:`meshkit.tracing.spans.provider` (``provider("orders", exporter=otlp_exporter(...))``). TLS trusts the
system's certificate authorities, or the file named by ``OTEL_EXPORTER_OTLP_CERTIFICATE``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from meshkit._core.optional import require
from meshkit.errors import ConfigurationError

__all__ = ["PROTOCOLS", "otlp_endpoint", "otlp_exporter"]

log = logging.getLogger(__name__)

#: The OTLP protocols meshkit exports with, by their ``OTEL_EXPORTER_OTLP_PROTOCOL`` names.
PROTOCOLS: Final = ("http/protobuf", "grpc")

_TRACES_PATH = "/v1/traces"
_HEADER_NAME = re.compile(
    r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
)  # an HTTP token (RFC 9110), which gRPC metadata keys are too


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigurationError(
            f"unknown OTLP protocol {protocol!r}; use one of: {', '.join(repr(p) for p in PROTOCOLS)}",
            hint='"http/protobuf" for an OTLP/HTTP endpoint (port 4318), "grpc" for OTLP/gRPC (port 4317)',
        )


def _split(endpoint: str, what: str) -> SplitResult:
    """``endpoint`` split as a URL (``host:port`` as a URL without a scheme), its host and port checked."""
    # "localhost:4317" would read as scheme "localhost": a bare host:port is split as "//host:port"
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise ConfigurationError(f"{what} {endpoint!r} has an invalid port: {exc}") from exc
    if not parts.hostname:
        raise ConfigurationError(f"{what} {endpoint!r} names no host")
    if port == 0:
        raise ConfigurationError(f"{what} {endpoint!r} has port 0")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            f"{what} {endpoint!r} has credentials in it",
            hint='send them as headers instead ([tracing] headers = { authorization = "..." })',
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{what} {endpoint!r} has a query or a fragment; an OTLP endpoint has neither")
    return parts


def otlp_endpoint(endpoint: str, protocol: str = "http/protobuf") -> str:
    """``endpoint`` checked for ``protocol`` and written as its exporter takes it.

    ``http/protobuf``: the traces URL (``/v1/traces`` added to a URL with no path). ``grpc``: the endpoint as given,
    less a trailing ``/`` (its scheme says plaintext or TLS). Raises :class:`~meshkit.errors.ConfigurationError`
    for an endpoint that cannot be right for the protocol, with a hint.
    """
    _check_protocol(protocol)
    endpoint = endpoint.strip()
    if not endpoint:
        raise ConfigurationError("the OTLP endpoint is empty", hint="leave it unset to use the built-in collector")
    if protocol == "grpc":
        return _grpc_endpoint(endpoint)
    return _http_endpoint(endpoint)


def _http_endpoint(endpoint: str) -> str:
    what = "OTLP/HTTP endpoint"
    scheme = endpoint.partition("://")[0].lower() if "://" in endpoint else ""
    if scheme not in ("http", "https"):
        grpc_like = scheme in ("", "grpc", "grpcs", "dns")
        raise ConfigurationError(
            f"{what} {endpoint!r} is not an http:// or https:// URL",
            hint=(
                f"write the traces URL, e.g. http://{endpoint.partition('://')[2] or endpoint}/v1/traces"
                + ('; or, for an OTLP/gRPC collector (port 4317), set protocol = "grpc"' if grpc_like else "")
            ),
        )
    parts = _split(endpoint, what)
    if parts.path in ("", "/"):
        return parts._replace(path=_TRACES_PATH).geturl()
    return endpoint


def _grpc_endpoint(endpoint: str) -> str:
    what = "OTLP/gRPC endpoint"
    scheme = endpoint.partition("://")[0].lower() if "://" in endpoint else ""
    if scheme not in ("", "http", "https"):
        raise ConfigurationError(
            f"{what} {endpoint!r} has the scheme {scheme!r}",
            hint="write http://host:4317 (plaintext), https://host:4317 (TLS) or host:4317 (TLS)",
        )
    parts = _split(endpoint, what)
    if parts.path not in ("", "/"):
        fixed = f"{scheme}://{parts.netloc}" if scheme else parts.netloc
        hint = f"use {fixed!r}"
        if parts.path.rstrip("/").endswith(_TRACES_PATH):
            hint += f'; {_TRACES_PATH} is the OTLP/HTTP path: to send there, set protocol = "http/protobuf" (port 4318)'
        raise ConfigurationError(
            f"{what} {endpoint!r} has a path ({parts.path}): gRPC calls the collector at host:port, with no path",
            hint=hint,
        )
    return endpoint.rstrip("/")


def _headers(headers: Mapping[str, str] | None, protocol: str) -> dict[str, str] | None:
    if not headers:
        return None  # the exporter then reads OTEL_EXPORTER_OTLP_HEADERS, as OpenTelemetry documents
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ConfigurationError(
                f"invalid OTLP header name {name!r}", hint="a header name is letters, digits and -"
            )
        if "\r" in value or "\n" in value:
            raise ConfigurationError(f"the OTLP header {name!r} has a line break in its value")
        # gRPC metadata keys must be lower case (HTTP header names are case-insensitive, so nothing is lost)
        checked[name.lower() if protocol == "grpc" else name] = value
    return checked


def otlp_exporter(
    endpoint: str,
    *,
    protocol: str = "http/protobuf",
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Any:
    """The OpenTelemetry SDK span exporter that sends to ``endpoint`` over ``protocol`` (``"http/protobuf"`` or
    ``"grpc"``), with ``headers`` on every export (an API key for a hosted backend) and ``timeout`` seconds per
    export. Close it with the tracer provider's ``shutdown()`` (it shuts its exporters down).

    Raises :class:`~meshkit.errors.ConfigurationError` for an unknown protocol, an endpoint that cannot be right for
    the protocol (see :func:`otlp_endpoint`) or an invalid header, and
    :class:`~meshkit.errors.MissingDependency` when the protocol's exporter is not installed (``meshkit[otel]``).
    """
    target = otlp_endpoint(endpoint, protocol)
    sent = _headers(headers, protocol)
    if not timeout > 0:
        raise ConfigurationError(f"the OTLP export timeout must be more than 0 seconds, not {timeout!r}")
    log.debug("OTLP span exporter", extra={"endpoint": target, "protocol": protocol})
    if protocol == "grpc":
        grpc = require("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "otel")
        scheme = target.partition("://")[0].lower() if "://" in target else ""
        # http:// is plaintext and https:// TLS, whatever OTEL_EXPORTER_OTLP_INSECURE says; host:port is left to it
        insecure = {"http": True, "https": False}.get(scheme)
        return grpc.OTLPSpanExporter(endpoint=target, insecure=insecure, headers=sent, timeout=timeout)
    http = require("opentelemetry.exporter.otlp.proto.http.trace_exporter", "otel")
    return http.OTLPSpanExporter(endpoint=target, headers=sent, timeout=timeout)
