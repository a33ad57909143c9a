"""Trusted proxies and X-Forwarded-For, and the ``ip_filter``, ``cors`` and ``request_size`` plugins.

Unit tests of our own logic: the hooks are called with hand-built requests, as the gateway calls them.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import re
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meshkit.errors import ConfigurationError
from meshkit.gateway.access import Cors, IpFilter, RequestSize, RequestSizeOptions
from meshkit.gateway.config import parse_size
from meshkit.gateway.forwarded import NetworkSet, TrustedProxies, forwarded_for_value, parse_address, parse_network
from meshkit.gateway.plugin import Headers, Plugin, ProxyRequest, Reply, ResponseHead


def request(
    method: str = "GET",
    *,
    client: str = "198.51.100.7",
    headers: Iterable[tuple[str, str]] = (),
    path: str = "/api/orders",
) -> ProxyRequest:
    return ProxyRequest(method, path, "", Headers(headers), client, peer=client, route="orders")


def answer(plugin: Plugin, req: ProxyRequest) -> Reply | None:
    """The plugin's ``request`` hook, which must answer synchronously."""
    result = plugin.request(req)
    assert not inspect.isawaitable(result)
    return result


def message(reply: Reply) -> str:
    body = json.loads(reply.body)
    assert body["status"] == reply.status
    return str(body["message"])


# -- trusted proxies and X-Forwarded-For -------------------------------------------------------------------------------

PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    none = TrustedProxies([])
    assert not none
    assert none.client_address("10.0.0.1", ["203.0.113.9"]) == "10.0.0.1"


def test_a_spoofed_header_from_an_untrusted_peer_is_ignored() -> None:
    assert PROXIES.client_address("198.51.100.1", ["203.0.113.9"]) == "198.51.100.1"
    assert PROXIES.client_address("198.51.100.1", ["10.0.0.3, 203.0.113.9"]) == "198.51.100.1"
    assert PROXIES.client_address("198.51.100.1", []) == "198.51.100.1"


def test_a_chain_through_two_trusted_proxies() -> None:
    # client 203.0.113.9 -> proxy 10.0.0.1 -> proxy 10.0.0.2 -> gateway
    assert PROXIES.client_address("10.0.0.2", ["203.0.113.9, 10.0.0.1"]) == "203.0.113.9"
    # what the client itself wrote (left of its own address) is never believed, across several fields too
    assert PROXIES.client_address("10.0.0.2", ["1.1.1.1, 8.8.8.8", "203.0.113.9", "10.0.0.1"]) == "203.0.113.9"
    assert PROXIES.client_address("10.0.0.2", ["10.0.0.1"]) == "10.0.0.1"  # every hop trusted: the left-most
    assert PROXIES.client_address("10.0.0.2", []) == "10.0.0.2"


def test_ipv6_and_mapped_addresses() -> None:
    assert PROXIES.client_address("2001:db8:ffff::1", ["2001:DB8:0::1"]) == "2001:db8::1"  # canonical form
    assert PROXIES.client_address("2001:db8:ffff::1", ["2001:db8::1, [2001:db8:ffff::2]:443"]) == "2001:db8::1"
    assert PROXIES.client_address("2001:db8:fffe::1", ["2001:db8::1"]) == "2001:db8:fffe::1"  # outside the /48
    assert PROXIES.client_address("::ffff:10.0.0.2", ["203.0.113.9"]) == "203.0.113.9"  # a dual-stack socket
    assert PROXIES.client_address("10.0.0.2", ["203.0.113.9:5555"]) == "203.0.113.9"  # ports are dropped


def test_garbage_stops_the_walk_and_is_never_returned() -> None:
    assert PROXIES.client_address("10.0.0.2", ["203.0.113.9, unknown"]) == "10.0.0.2"
    assert PROXIES.client_address("10.0.0.2", ["<script>, 10.0.0.1"]) == "10.0.0.1"
    assert PROXIES.client_address("10.0.0.2", ["203.0.113.9, 10.0.0.1:xx"]) == "10.0.0.2"
    assert PROXIES.client_address("10.0.0.2", ["[2001:db8::1]junk"]) == "10.0.0.2"
    assert PROXIES.client_address("10.0.0.2", ["203.0.113.9, , 10.0.0.1,"]) == "203.0.113.9"  # empty items skipped
    assert PROXIES.client_address("10.0.0.2", ["1" * 10_000 + ", 10.0.0.1"]) == "10.0.0.1"


@given(chain=st.lists(st.text(max_size=30), max_size=4), peer=st.sampled_from(["10.0.0.2", "198.51.100.1"]))
def test_the_answer_is_always_the_peer_or_an_address(chain: list[str], peer: str) -> None:
    client = PROXIES.client_address(peer, chain)
    assert client == peer or str(ipaddress.ip_address(client)) == client
    if peer == "198.51.100.1":
        assert client == peer


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("10.0.0.0/33", "not an IP address or CIDR"),
        ("10.1.2.3/8", "did you mean '10.0.0.0/8'"),
        ("proxy.internal", "not an IP address or CIDR"),
        ("", "not an IP address or CIDR"),
    ],
)
def test_bad_trusted_proxies_are_configuration_errors(entry: str, error: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(error)):
        TrustedProxies(["10.0.0.0/8", entry])


def test_trusts_and_a_single_string() -> None:
    proxies = TrustedProxies("192.0.2.1")
    assert proxies.trusts("192.0.2.1")
    assert not proxies.trusts("192.0.2.2")
    assert not proxies.trusts("nonsense")
    assert PROXIES.trusts("::ffff:10.1.2.3")


def test_forwarded_for_value() -> None:
    assert forwarded_for_value([], "198.51.100.1") == "198.51.100.1"
    assert forwarded_for_value(["203.0.113.9, 10.0.0.1", " ", "10.0.0.2"], "10.0.0.3") == (
        "203.0.113.9, 10.0.0.1, 10.0.0.2, 10.0.0.3"
    )
    # the policy-aware variant passes the chain on only from a trusted peer
    assert PROXIES.forwarded_for_value(["203.0.113.9"], "2001:db8:ffff::1") == "203.0.113.9, 2001:db8:ffff::1"
    assert PROXIES.forwarded_for_value(["6.6.6.6"], "198.51.100.1") == "198.51.100.1"
    assert TrustedProxies([]).forwarded_for_value(["6.6.6.6"], "10.0.0.1") == "10.0.0.1"


def test_parse_address_forms() -> None:
    assert parse_address(" 192.0.2.1 ") == ipaddress.ip_address("192.0.2.1")
    assert parse_address("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")
    assert parse_address("[2001:db8::1]:80") == ipaddress.ip_address("2001:db8::1")
    for garbage in ("", "[192.0.2.1]", "2001:db8::1:80:x", "192.0.2.1:", "[2001:db8::1]:", "1.2.3"):
        assert parse_address(garbage) is None, garbage


networks_strategy = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]) if t[1] else 0, t[1]))
    ),
    max_size=6,
)


@given(networks=networks_strategy, probes=st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_network_set_agrees_with_a_plain_loop(networks: list[ipaddress.IPv4Network], probes: list[int]) -> None:
    merged = NetworkSet(networks)
    for net in networks:  # the edges of every network, and one past them
        probes += [int(net.network_address), int(net.broadcast_address)]
        probes += [v for v in (int(net.network_address) - 1, int(net.broadcast_address) + 1) if 0 <= v < 2**32]
    for value in probes:
        address = ipaddress.IPv4Address(value)
        assert (address in merged) == any(address in net for net in networks), address


def test_network_set_keeps_versions_apart() -> None:
    both = NetworkSet([parse_network("0.0.0.0/0")])
    assert ipaddress.ip_address("192.0.2.1") in both
    assert ipaddress.ip_address("2001:db8::1") not in both
    assert "192.0.2.1" not in both  # text is not an address


# -- ip_filter ---------------------------------------------------------------------------------------------------------


def test_allow_list_denies_everything_else() -> None:
    ip_filter = IpFilter({"allow": ["10.0.0.0/8", "2001:db8::/32"]})
    assert answer(ip_filter, request(client="10.20.30.40")) is None
    assert answer(ip_filter, request(client="2001:db8:1::1")) is None
    assert answer(ip_filter, request(client="::ffff:10.0.0.1")) is None
    refused = answer(ip_filter, request(client="192.0.2.1"))
    assert refused is not None
    assert refused.status == 403
    assert message(refused) == "your address is not allowed"
    assert answer(ip_filter, request(client="2001:db9::1")) is not None


def test_deny_wins_over_allow() -> None:
    ip_filter = IpFilter({"allow": ["10.0.0.0/8"], "deny": ["10.6.6.0/24", "10.9.9.9"]})
    assert answer(ip_filter, request(client="10.6.5.255")) is None
    assert answer(ip_filter, request(client="10.6.6.7")) is not None
    assert answer(ip_filter, request(client="10.9.9.9")) is not None
    assert answer(ip_filter, request(client="10.9.9.10")) is None


def test_deny_list_alone_lets_the_rest_through() -> None:
    ip_filter = IpFilter({"deny": ["192.0.2.0/24", "2001:db8:bad::/48"]})
    assert answer(ip_filter, request(client="198.51.100.1")) is None
    assert answer(ip_filter, request(client="192.0.2.200")) is not None
    assert answer(ip_filter, request(client="2001:db8:bad:1::1")) is not None
    assert answer(ip_filter, request(client="2001:db8:bae::1")) is None
    assert answer(ip_filter, request(client="not-an-address")) is not None  # unreadable: refused
    assert answer(ip_filter, request(client="")) is not None


def test_ip_filter_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="allow or a deny"):
        IpFilter({})
    with pytest.raises(ValidationError, match=re.escape("did you mean '192.0.2.0/24'")):
        IpFilter({"allow": ["192.0.2.1/24"]})
    with pytest.raises(ValidationError, match="not an IP address or CIDR"):
        IpFilter({"deny": ["example.com"]})
    with pytest.raises(ValidationError, match="extra"):
        IpFilter({"allow": ["10.0.0.0/8"], "allowed": []})


# -- cors --------------------------------------------------------------------------------------------------------------

APP = "https://app.example"


def preflight(origin: str, method: str = "PUT", headers: str | None = None) -> ProxyRequest:
    fields = [("origin", origin), ("access-control-request-method", method)]
    if headers is not None:
        fields.append(("access-control-request-headers", headers))
    return request("OPTIONS", headers=fields)


def respond(cors: Cors, req: ProxyRequest, upstream: Iterable[tuple[str, str]] = ()) -> Headers:
    assert answer(cors, req) is None
    resp = ResponseHead(200, Headers(upstream))
    cors.response(req, resp)
    return resp.headers


def test_preflight_is_answered_by_the_gateway() -> None:
    cors = Cors(
        {
            "allow_origins": [APP],
            "allow_methods": ["GET", "PUT", "DELETE"],
            "allow_headers": ["Content-Type", "X-Request-Id"],
            "allow_credentials": True,
            "max_age": 3600,
        }
    )
    req = preflight(APP, "PUT", "content-type, X-Request-ID")
    reply = answer(cors, req)
    assert reply is not None
    assert reply.status == 204
    assert reply.body == b""
    assert dict(reply.headers.items()) == {
        "access-control-allow-origin": APP,
        "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, PUT, DELETE",
        "access-control-allow-headers": "content-type, x-request-id",
        "access-control-max-age": "3600",
    }
    before = list(reply.headers.items())
    cors.response(req, ResponseHead(reply.status, reply.headers))  # the gateway runs response hooks on replies
    assert list(reply.headers.items()) == before


def test_preflight_refusals() -> None:
    cors = Cors({"allow_origins": [APP], "allow_methods": ["PUT"], "allow_headers": ["content-type"]})
    for req, why in [
        (preflight("https://evil.example"), "origin 'https://evil.example' is not allowed"),
        (preflight(APP, "DELETE"), "method 'DELETE' is not allowed"),
        (preflight(APP, "PUT", "content-type, x-secret, authorization"), "headers x-secret, authorization not allowed"),
    ]:
        reply = answer(cors, req)
        assert reply is not None
        assert reply.status == 403
        assert message(reply) == f"CORS: {why}"
        assert reply.headers.get("access-control-allow-origin") is None
    # a CORS-safelisted method needs no listing: browsers send it anyway (Fetch)
    reply = answer(cors, preflight(APP, "GET", "content-type"))
    assert reply is not None
    assert reply.status == 204


def test_wildcards_echo_what_the_preflight_asks() -> None:
    cors = Cors({"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"]})
    reply = answer(cors, preflight("https://anyone.example", "PATCH", "Authorization, X-Custom"))
    assert reply is not None
    assert reply.status == 204
    assert reply.headers.get("access-control-allow-origin") == "*"
    assert reply.headers.get("access-control-allow-methods") == "PATCH"
    assert reply.headers.get("access-control-allow-headers") == "authorization, x-custom"
    assert reply.headers.get("vary") == "Access-Control-Request-Method, Access-Control-Request-Headers"
    assert "access-control-allow-credentials" not in reply.headers


def test_options_without_a_request_method_is_not_a_preflight() -> None:
    cors = Cors({"allow_origins": [APP]})
    headers = respond(cors, request("OPTIONS", headers=[("origin", APP)]))
    assert headers.get("access-control-allow-origin") == APP


def test_actual_requests_get_the_headers_of_their_origin() -> None:
    cors = Cors({"allow_origins": [APP], "allow_credentials": True, "expose_headers": ["X-Total-Count"]})
    upstream = [("vary", "Accept-Encoding"), ("access-control-allow-origin", "*"), ("content-type", "text/plain")]
    headers = respond(cors, request(headers=[("origin", APP)]), upstream)
    assert headers.get_all("access-control-allow-origin") == [APP]  # the upstream's is replaced
    assert headers.get_all("vary") == ["Accept-Encoding", "Origin"]
    assert headers.get("access-control-allow-credentials") == "true"
    assert headers.get("access-control-expose-headers") == "x-total-count"
    refused = respond(cors, request(headers=[("origin", "https://evil.example")]), upstream)
    assert "access-control-allow-origin" not in refused
    assert refused.get_all("vary") == ["Accept-Encoding", "Origin"]
    # no Origin: nothing to allow, but a cache must still know the answer depends on it
    plain = respond(cors, request())
    assert list(plain.items()) == [("vary", "Origin")]


def test_any_origin_without_credentials_is_a_constant_star() -> None:
    cors = Cors({"allow_origins": ["*"], "expose_headers": ["x-total-count"]})
    for req in (request(), request(headers=[("origin", "https://x.example")])):
        headers = respond(cors, req)
        assert headers.get("access-control-allow-origin") == "*"
        assert headers.get("access-control-expose-headers") == "x-total-count"
        assert "vary" not in headers


def test_origin_regexes_match_whole_origins() -> None:
    cors = Cors({"allow_origin_regex": [r"https://[a-z0-9-]+\.shop\.example"]})
    assert cors.origin_allowed("https://eu.shop.example")
    assert not cors.origin_allowed("https://eu.shop.example.evil.net")
    assert not cors.origin_allowed("http://eu.shop.example")
    assert respond(cors, request(headers=[("origin", "https://eu.shop.example")])).get(
        "access-control-allow-origin"
    ) == ("https://eu.shop.example")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "cannot be used with allow_credentials"),
        ({"allow_origins": ["https://app.example/"]}, "did you mean 'https://app.example'"),
        ({"allow_origins": ["app.example"]}, "is not an origin"),
        ({"allow_origins": ["https://app.example:99999"]}, "bad port"),
        ({}, "needs allow_origins or allow_origin_regex"),
        ({"allow_origin_regex": ["("]}, "bad regular expression"),
        ({"allow_origins": [APP], "allow_methods": ["GET POST"]}, "not a valid method"),
        ({"allow_origins": [APP], "allow_credentials": True, "expose_headers": ["*"]}, "not honoured"),
    ],
)
def test_cors_options_are_checked(options: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        Cors(options)


def test_configured_origins_are_normalised() -> None:
    cors = Cors({"allow_origins": ["HTTPS://App.Example:8443", "null"]})
    assert cors.origin_allowed("https://app.example:8443")
    assert cors.origin_allowed("null")
    assert not cors.origin_allowed("https://app.example")


# -- request_size ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1MB", 1_000_000),
        ("512KiB", 524_288),
        ("1.5KB", 1500),
        ("10mib", 10 * 1024 * 1024),
        ("2K", 2048),
        ("100", 100),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert RequestSizeOptions(max_body=text).max_body == size  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["1 parsec", "MB", "-1", "", True, 1.5])
def test_bad_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="max_body"):
        RequestSizeOptions(max_body=bad)  # type: ignore[arg-type]


def test_request_size_refuses_a_declared_length_over_the_limit() -> None:
    limit = RequestSize({"max_body": "1KiB"})
    assert limit.max_body == 1024  # the server cuts chunked bodies at the same size
    assert answer(limit, request("POST", headers=[("content-length", "1024")])) is None
    assert answer(limit, request("POST", headers=[("content-length", "0001024")])) is None
    assert answer(limit, request("POST")) is None  # no length: the server counts the chunks
    refused = answer(limit, request("POST", headers=[("content-length", "1025")]))
    assert refused is not None
    assert refused.status == 413
    assert message(refused) == "the request body is larger than the limit of 1024 bytes"
    huge = answer(limit, request("POST", headers=[("content-length", "9" * 10_000)]))
    assert huge is not None
    assert huge.status == 413
    # not a length at all: the server's parser refuses it; the plugin does not guess
    assert answer(limit, request("POST", headers=[("content-length", "12a")])) is None
    assert answer(limit, request("POST", headers=[("content-length", "\u00b2")])) is None
