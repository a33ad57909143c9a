"""HTTP/1.1 pieces the gateway's server needs: request-target normalisation, header checks, framing.

The gateway forwards what it *understood*, never the raw bytes it was sent: the path the routes matched (and the
upstream receives) is the normalised one, and the framing headers (``Content-Length`` / ``Transfer-Encoding``) it
sends are its own. That is what keeps a request from meaning one thing to the gateway and another to the upstream.
"""

from __future__ import annotations

import re

__all__ = [
    "HOP_BY_HOP",
    "BadRequest",
    "normalise_path",
    "quote_path",
]

#: Headers that describe one connection, not the message: never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "content-length",  # the gateway frames the body itself
        "expect",  # the gateway answers 100-continue itself
    }
)

_SAFE_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_HEX = "0123456789ABCDEFabcdef"
# what stays percent-encoded after normalisation: '/' and '%' (decoding them would change the path's structure),
# and what may not appear raw in a path
_KEEP_ENCODED = {"2F", "25"}
_QUOTE_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%")


class BadRequest(Exception):
    """The request cannot be forwarded as it is: ``status`` (400, 414, 431, 413, 501...) and a message that says
    why (sent to the client in the gateway's JSON error body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def normalise_path(raw: str) -> str:
    """The path a request means: percent-decoded (except ``%2F`` and ``%25``, kept upper-case), dot segments
    resolved, repeated slashes merged. Raises :class:`BadRequest` for what has no single meaning: a NUL, invalid
    percent-encoding, a path that is not UTF-8 once decoded, a path that does not start with ``/``."""
    if not raw.startswith("/"):
        raise BadRequest(400, "the request path must start with '/'")
    if "%" not in raw and "/." not in raw and "//" not in raw and _SAFE_PATH.fullmatch(raw):
        return raw  # the common case: nothing to do
    if "%" in raw:
        raw = _percent_decode(raw)
    if "//" in raw:
        raw = re.sub("/{2,}", "/", raw)
    if "/." in raw:
        raw = _remove_dot_segments(raw)
    return raw


def _percent_decode(raw: str) -> str:
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch != "%":
            out += ch.encode()
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadRequest(400, "invalid percent-encoding in the request path")
        upper = pair.upper()
        if upper == "00":
            raise BadRequest(400, "the request path may not contain a NUL byte (%00)")
        if upper in _KEEP_ENCODED:
            out += b"%" + upper.encode()
        else:
            out.append(int(pair, 16))
        i += 3
    try:
        text = out.decode()
    except UnicodeDecodeError:
        raise BadRequest(400, "the request path is not UTF-8 once percent-decoded") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadRequest(400, "the request path may not contain control characters")
    return text


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on a path that starts with '/': ``..`` above the root stays at the root."""
    trailing = path.endswith(("/.", "/.."))
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/" + "/".join(out)
    if trailing and not result.endswith("/"):
        result += "/"
    return result


def quote_path(path: str) -> str:
    """A normalised path as a request-target again (what :func:`normalise_path` decoded, encoded)."""
    if _SAFE_PATH.fullmatch(path):
        return path
    out: list[str] = []
    for ch in path:
        if ch in _QUOTE_SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    return "".join(out)
