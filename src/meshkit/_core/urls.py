"""The one way a backend reads its URL: options from the query string or keyword arguments, passwords hidden.

Every backend (brokers, registries) is opened by URL, and a user may write an option either way:
``redis://host/0?prefix=app`` or ``connect("redis://host/0", prefix="app")`` (the keyword wins). An unknown option
is refused by name with a did-you-mean; a bad value names the option and the type it wants. Errors and logs show
URLs through :func:`redact`, never with a password or the query (which may hold credentials).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from meshkit.errors import ConfigurationError

__all__ = ["Parser", "flag", "redact", "url_options"]

#: Turns an option's text (from a query string) into its value; raises ``ValueError`` on bad text.
Parser = Callable[[str], Any]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def flag(value: str) -> bool:
    """A boolean query option: ``1/true/yes/on`` or ``0/false/no/off``."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r} (use true or false)")


def redact(url: str) -> str:
    """``url`` fit for an error message or a log line: the password masked and the query dropped."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hosts}" if at else hosts
    if not parts.scheme:
        return urlunsplit(("", netloc, parts.path, "", ""))
    return f"{parts.scheme}://{netloc}{parts.path}"  # keeps the // of a URL with no host (amqp:///vhost)


def url_options(
    url: str,
    known: Mapping[str, Parser],
    given: Mapping[str, Any],
    *,
    what: str,
    passthrough: Collection[str] = (),
    keywords: Collection[str] = (),
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The options of ``url``'s query string parsed with ``known``, with the keyword arguments ``given`` laid over.

    ``what`` names the backend in errors ("Redis broker"). Query names in ``passthrough`` are the driver's own: they
    come back apart, as ``(name, text)`` pairs, untouched. ``keywords`` are extra names allowed only as keyword
    arguments (objects such as a clock).
    """
    options: dict[str, Any] = {}
    driver: list[tuple[str, str]] = []
    choices = sorted({*known, *passthrough})
    for name, text in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name in passthrough:
            driver.append((name, text))
            continue
        parser = known.get(name)
        if parser is None:
            raise ConfigurationError(f"unknown {what} option {name!r} in {redact(url)!r}", hint=_hint(name, choices))
        try:
            options[name] = parser(text)
        except ValueError as exc:
            kind = getattr(parser, "__name__", "")
            wants = f" (a {kind})" if kind in ("int", "float", "str") else ""
            raise ConfigurationError(f"bad value {text!r} for {what} option {name!r}{wants}: {exc}") from exc
    for name in given:
        if name not in known and name not in keywords:
            raise ConfigurationError(f"unknown {what} option {name!r}", hint=_hint(name, sorted({*choices, *keywords})))
    options.update(given)
    return options, driver


def _hint(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(choices)}"


def redis_url(url: str, what: str) -> SplitResult:
    """The parts of a ``redis://`` or ``rediss://`` URL, or a :class:`ConfigurationError` naming what is wrong
    (the scheme, the port, a path that is not a database number); credentials never appear in the message."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"not a Redis URL: {redact(url)!r}", hint="use redis://host:port/db or rediss://")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as exc:
        raise ConfigurationError(f"bad port in {what} URL {redact(url)!r}", hint="use redis://host:6379/0") from exc
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigurationError(
            f"bad database {db!r} in {what} URL {redact(url)!r}", hint="the path is a database number: /0"
        )
    return parts
