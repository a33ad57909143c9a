"""What every transport shares: the request and response values, headers, and the :class:`Transport` protocol.

A transport carries one :class:`Request` to one chosen :class:`~meshkit.discovery.Instance` and brings back a
:class:`Response`. It does not balance, retry or time out on its own: the :class:`~meshkit.client.ServiceClient`
does that once, above every transport, so HTTP and in-process calls behave the same. A transport's only duties
are to map its driver's errors at the boundary (connect failures to :class:`~meshkit.errors.Unavailable` with
``request_sent = False``, lost connections to ``Unavailable``, its own timeouts to
:class:`~meshkit.errors.TimeoutExceeded`) and to release what it holds in :meth:`Transport.aclose`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from meshkit.discovery import Instance
from meshkit.errors import HTTPStatusError

__all__ = ["Headers", "HeadersLike", "Request", "Response", "Transport"]

HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]
"""What a caller may pass as headers: a mapping, or ``(name, value)`` pairs (repeated names allowed)."""


class Headers(Mapping[str, str]):
    """Case-insensitive, immutable HTTP headers that keep repeated fields and the order they came in.

    ``headers["content-type"]`` and ``headers["Content-Type"]`` are the same field; a repeated field reads as its
    values joined by ``", "`` (RFC 9110 5.3), and :meth:`get_list` gives them one by one. :meth:`raw` is the pairs as
    received, for a transport to send on.
    """

    __slots__ = ("_index", "_pairs")
    _pairs: tuple[tuple[str, str], ...]

    def __init__(self, headers: HeadersLike | None = None) -> None:
        if headers is None:
            pairs: tuple[tuple[str, str], ...] = ()
        elif isinstance(headers, Headers):
            pairs = headers._pairs
        elif isinstance(headers, Mapping):
            pairs = tuple((str(k), str(v)) for k, v in headers.items())
        else:
            pairs = tuple((str(k), str(v)) for k, v in headers)
        self._pairs = pairs
        self._index: dict[str, str] | None = None  # built on the first lookup: most responses are never read

    def _lookup(self) -> dict[str, str]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self._pairs:
                key = name.lower()
                index[key] = f"{index[key]}, {value}" if key in index else value
            self._index = index
        return index

    def __getitem__(self, name: str) -> str:
        return self._lookup()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __iter__(self) -> Iterator[str]:
        """The field names, lower-cased, once each."""
        return iter(self._lookup())

    def __len__(self) -> int:
        return len(self._lookup())

    def get_list(self, name: str) -> list[str]:
        """Every value of ``name``, in order (empty if absent)."""
        key = name.lower()
        return [v for k, v in self._pairs if k.lower() == key]

    def raw(self) -> tuple[tuple[str, str], ...]:
        """The pairs as given (names in their original case)."""
        return self._pairs

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._lookup() == other._lookup()
        if isinstance(other, Mapping):
            return self._lookup() == {str(k).lower(): v for k, v in other.items()}
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to plain dicts, so unhashable like them

    def __repr__(self) -> str:
        return f"Headers({list(self._pairs)!r})"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, before an instance is chosen: ``method``, ``path`` (no query), the encoded ``query``
    string (no ``?``), ``headers`` and the body ``content``. The client builds it once per call and sends the
    same value on every attempt."""

    method: str
    path: str
    query: str = ""
    headers: Headers = field(default_factory=Headers)
    content: bytes = b""

    @property
    def target(self) -> str:
        """The request target: ``path?query``."""
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(frozen=True, slots=True, eq=False)
class Response:
    """What an instance answered: ``status``, ``headers`` (case-insensitive), ``content`` (the whole body), the
    ``instance`` that answered and the ``request`` it answered.

    Error statuses are returned, not raised: call :meth:`raise_for_status` when a 4xx or 5xx is an error to you.
    """

    status: int
    headers: Headers
    content: bytes
    instance: Instance | None = None
    request: Request | None = None

    @property
    def is_success(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status < 300

    @property
    def encoding(self) -> str:
        """The ``charset`` of the ``Content-Type`` header, UTF-8 when none is given."""
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                return value.strip('"')
        return "utf-8"

    @property
    def text(self) -> str:
        """The body decoded with :attr:`encoding` (undecodable bytes replaced, as browsers do)."""
        return self.content.decode(self.encoding, errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.content)

    def raise_for_status(self) -> Response:
        """Raise :class:`~meshkit.errors.HTTPStatusError` for a 4xx or 5xx status; return the response otherwise,
        so it chains: ``data = (await client.get("/x")).raise_for_status().json()``."""
        if self.status < 400:
            return self
        what = f"{self.request.method} {self.request.target}" if self.request is not None else "the request"
        who = f" ({self.instance.service} at {self.instance.address})" if self.instance is not None else ""
        kind = "client error" if self.status < 500 else "server error"
        raise HTTPStatusError(
            f"{what} answered {self.status} ({kind}){who}: {_snippet(self.text)}", status=self.status, response=self
        )

    def __repr__(self) -> str:
        who = f" from {self.instance.address}" if self.instance is not None else ""
        return f"<Response {self.status}{who}, {len(self.content)} bytes>"


def _snippet(text: str, limit: int = 200) -> str:
    """The start of a body for an error message: one line, at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@runtime_checkable
class Transport(Protocol):
    """Carries a request to one instance. See the module docstring for what a transport must and must not do.

    ``timeout`` is the time budget of this attempt (``None``: none). The client enforces it already (it cancels
    the attempt); a transport may use it to bound its own I/O, such as connecting.
    """

    async def send(self, instance: Instance, request: Request, timeout: float | None) -> Response: ...

    async def aclose(self) -> None: ...
