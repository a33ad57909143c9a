"""Who is the client: ``X-Forwarded-For`` read through a list of trusted proxies.

Behind a load balancer every connection comes from the balancer, and the address of the real client is only in the
``X-Forwarded-For`` header the balancer adds. Anyone can send that header, so it is believed only as far as it was
written by proxies the gateway is told to trust (the gateway's ``trusted_proxies`` option, CIDRs or addresses)::

    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
    proxies.client_address("10.0.0.7", ["203.0.113.9, 10.0.0.5"])   # -> "203.0.113.9"
    proxies.client_address("198.51.100.1", ["1.2.3.4"])              # -> "198.51.100.1": the peer is not trusted

The rule (the one nginx's ``real_ip_recursive`` and most proxies follow):

1. Start from the socket peer. If it is not a trusted proxy, it is the client: the header is ignored entirely.
2. Otherwise walk the chain (every ``X-Forwarded-For`` field joined in order, comma separated) from the right. Each
   entry is the address the previous hop (a trusted proxy) saw. The first entry that is not a trusted proxy is the
   client.
3. An entry that is not an IP address (``unknown``, garbage) stops the walk: the answer is the last
   address known to be good (the last trusted hop, or the peer), never the garbage. Entries may carry a port
   (``1.2.3.4:5678``, ``[2001:db8::1]:443``), as some balancers write them; the port is dropped. Empty list items
   (``a,,b``) are skipped, as HTTP's list syntax says.
4. If every entry is trusted, the left-most one is the client.

Addresses are returned in canonical text form (``2001:db8::1``, not ``2001:DB8:0::1``). An IPv4-mapped IPv6 peer
(``::ffff:10.0.0.7``, as a dual-stack socket reports IPv4 clients) is matched against the IPv4 networks too.

With no trusted proxies configured, :meth:`TrustedProxies.client_address` returns the peer at once.

:class:`NetworkSet` is the address-in-any-of-these-networks test used here and by the ``ip_filter`` plugin: the
networks are merged into sorted ranges, so a lookup is one binary search, however many networks are configured.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable

from meshkit.errors import ConfigurationError

__all__ = ["IPAddress", "NetworkSet", "TrustedProxies", "forwarded_for_value", "parse_address", "parse_network"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# how many addresses (peers, chain entries) TrustedProxies remembers the verdict of: the proxies are few, the bound is
# for clients (a gateway facing the internet directly sees many peers, and anyone can write any chain)
_CACHE = 4096
_UNSEEN = ("", False)  # a cache miss (compared by identity)
_LONGEST = 100  # longer than any address text, even "[v6 with an IPv4 tail and a zone]:port"


def parse_network(text: str) -> _Network:
    """``text`` (a CIDR such as ``10.0.0.0/8`` or one address) as a network; ``ValueError`` saying what is wrong.

    A CIDR with host bits set (``10.1.2.3/8``) is refused rather than silently widened: it names the network it
    probably meant.
    """
    if not isinstance(text, str):
        raise ValueError(f"not an IP address or CIDR: {text!r} (write it as a string)")  # noqa: TRY004 - pydantic
    value = text.strip()
    try:
        return ipaddress.ip_network(value)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(
                f"not an IP address or CIDR: {text!r} (use forms like 10.0.0.0/8, 192.0.2.1, 2001:db8::/32)"
            ) from exc
        raise ValueError(f"{text!r} has host bits set: did you mean {str(loose)!r}?") from exc


def parse_address(text: str) -> IPAddress | None:
    """One ``X-Forwarded-For`` entry as an address (a port and brackets around IPv6 allowed); ``None``: garbage."""
    value = text.strip()
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        pass
    if value[0] == "[":  # [2001:db8::1] or [2001:db8::1]:443
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else "?"
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        try:
            return ipaddress.IPv6Address(value[1:end])
        except ValueError:
            return None
    host, colon, port = value.partition(":")
    if colon and port.isdigit():  # 192.0.2.1:5678 (an IPv6 address has more than one colon and failed above)
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            return None
    return None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class NetworkSet:
    """A set of IPv4 and IPv6 networks with a fast ``address in networks`` test.

    The networks are merged into sorted, disjoint ranges of integers per IP version; a lookup is a binary search.
    IPv4-mapped IPv6 addresses are looked up as the IPv4 address they map.
    """

    __slots__ = ("_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts", "networks")

    def __init__(self, networks: Iterable[_Network]) -> None:
        self.networks: tuple[_Network, ...] = tuple(networks)
        self._v4_starts, self._v4_ends = self._ranges(n for n in self.networks if n.version == 4)
        self._v6_starts, self._v6_ends = self._ranges(n for n in self.networks if n.version == 6)

    @staticmethod
    def _ranges(networks: Iterable[_Network]) -> tuple[list[int], list[int]]:
        starts: list[int] = []
        ends: list[int] = []
        for first, last in sorted((int(n.network_address), int(n.broadcast_address)) for n in networks):
            if ends and first <= ends[-1] + 1:
                ends[-1] = max(ends[-1], last)
            else:
                starts.append(first)
                ends.append(last)
        return starts, ends

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        address = _unmapped(address)
        if address.version == 4:
            starts, ends = self._v4_starts, self._v4_ends
        else:
            starts, ends = self._v6_starts, self._v6_ends
        value = int(address)
        at = bisect.bisect_right(starts, value) - 1
        return at >= 0 and value <= ends[at]

    def __repr__(self) -> str:
        return f"NetworkSet([{', '.join(repr(str(n)) for n in self.networks)}])"


class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` the gateway believes (see the module docstring for the rule).

    ``proxies``: CIDRs or single addresses, IPv4 or IPv6. A bad entry raises
    :class:`~meshkit.errors.ConfigurationError` naming it.
    """

    __slots__ = ("_seen", "networks")

    def __init__(self, proxies: Iterable[str] = ()) -> None:
        if isinstance(proxies, str):
            proxies = [proxies]
        networks: list[_Network] = []
        for entry in proxies:
            try:
                networks.append(parse_network(entry))
            except ValueError as exc:
                raise ConfigurationError(
                    f"bad trusted_proxies entry: {exc}", hint="list CIDRs or addresses, e.g. [10.0.0.0/8, ::1]"
                ) from exc
        self.networks = NetworkSet(networks)
        self._seen: dict[str, tuple[str, bool] | None] = {}  # text -> _lookup's answer, bounded (oldest go first)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies([{', '.join(repr(str(n)) for n in self.networks.networks)}])"

    def _lookup(self, text: str) -> tuple[str, bool] | None:
        """``text`` (a peer, or one stripped chain entry) as (canonical address, trusted?); ``None``: not an address.

        Cached per text, bounded: the proxies' own addresses are few and come back on every request."""
        if len(text) > _LONGEST:
            return None  # no address is that long: and garbage this size is not worth a cache entry
        seen = self._seen.get(text, _UNSEEN)
        if seen is _UNSEEN:
            address = parse_address(text)
            seen = None if address is None else (str(address), address in self.networks)
            if len(self._seen) >= _CACHE:
                del self._seen[next(iter(self._seen))]
            self._seen[text] = seen
        return seen

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` (an address as text) is one of the trusted proxies."""
        seen = self._lookup(peer)
        return seen is not None and seen[1]

    def client_address(self, peer: str, forwarded_for: list[str]) -> str:
        """The client's address: ``peer`` (the socket peer) or an entry of ``forwarded_for`` (the values of every
        ``X-Forwarded-For`` field, in order), by the rule of the module docstring."""
        if not self.networks or not forwarded_for or not self.trusts(peer):
            return peer
        client = peer
        for value in reversed(forwarded_for):
            for entry in reversed(value.split(",")):
                text = entry.strip()
                if not text:
                    continue  # empty list elements are allowed and ignored (RFC 9110, 5.6.1)
                seen = self._lookup(text)
                if seen is None:
                    return client
                client, trusted = seen
                if not trusted:
                    return client
        return client

    def forwarded_for_value(self, existing: list[str], peer: str) -> str:
        """The ``X-Forwarded-For`` value to send upstream: the received chain (only when ``peer`` is a trusted
        proxy: what an untrusted client wrote is dropped) followed by ``peer``."""
        return forwarded_for_value(existing if existing and self.trusts(peer) else [], peer)


def forwarded_for_value(existing: list[str], peer: str) -> str:
    """The ``X-Forwarded-For`` value to send upstream: the chain received (every field, in order) plus ``peer``.

    The chain is passed on as it came; :meth:`TrustedProxies.forwarded_for_value` passes it on only from a trusted
    peer. (An upstream that trusts the gateway walks the chain by the same rule, so it stops at the appended peer
    when that peer is not one of its trusted proxies, either way.)
    """
    parts = [item for item in (value.strip() for value in existing) if item]
    if peer:
        parts.append(peer)
    return ", ".join(parts)
