"""The gateway's auth plugins: JWT (static keys and a real JWKS server) and API keys, and the JWT attack corpus."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm
from pydantic import BaseModel, ValidationError

from meshkit.errors import ConfigurationError
from meshkit.gateway.auth import (
    ApiKeyAuth,
    ApiKeyOptions,
    JwtAuth,
    JwtOptions,
    hash_api_key,
    new_api_key,
)
from meshkit.gateway.plugin import Headers, PluginContext, ProxyRequest, Reply, RequestResult
from meshkit.testing import eventually
from tests.gateway.jwt_corpus import (
    AUDIENCE,
    ISSUER,
    KID_RSA,
    KID_RSA_NEXT,
    JwksServer,
    Keys,
    attack_tokens,
    compact,
    corpus_options,
    good_claims,
    good_token,
    jwks_document,
    make_keys,
    public_jwk,
    public_pem,
    signer,
)

IDENTITY = ("x-consumer-id", "x-consumer-scopes")
LOGGER = "meshkit.gateway.auth"


class FakeClock:
    """The plugin's monotonic clock, moved by hand (JWKS cache and refetch budget)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


def request(authorization: str | None = None, *headers: tuple[str, str], query: str = "") -> ProxyRequest:
    items = [("host", "gateway.test"), *headers]
    if authorization is not None:
        items.append(("authorization", authorization))
    return ProxyRequest("GET", "/api/orders", query, Headers(items), "203.0.113.9", route="orders")


def spoofed(authorization: str | None = None) -> ProxyRequest:
    """A request whose client tries to set the identity headers itself."""
    return request(authorization, ("x-consumer-id", "admin"), ("x-consumer-scopes", "everything"))


def sync(result: RequestResult) -> Reply | None:
    """The hook's answer, which must have been given synchronously."""
    assert not inspect.isawaitable(result), "the hook returned an awaitable where it should answer synchronously"
    assert result is None or isinstance(result, Reply)
    return result


async def settle(result: RequestResult) -> Reply | None:
    if inspect.isawaitable(result):
        result = await result
    assert result is None or isinstance(result, Reply)
    return result


def message(reply: Reply | None) -> str:
    assert reply is not None, "expected a reply, the request was let through"
    data = json.loads(reply.body)
    assert data["status"] == reply.status
    return str(data["message"])


def static(keys: Keys, alg: str = "RS256", tmp_path: Path | None = None, **options: Any) -> JwtAuth:
    opts: dict[str, Any] = {"algorithms": [alg], "issuer": ISSUER, "audience": AUDIENCE, **options}
    if not ({"secret", "secret_env", "public_key", "public_key_file", "jwks_url"} & opts.keys()):
        if alg.startswith("HS"):
            opts["secret"] = keys.hmac_secret.decode()
        elif alg.startswith(("RS", "PS")):
            opts["public_key"] = public_pem(keys.rsa)
        elif alg.startswith("ES"):
            opts["public_key"] = public_pem(keys.ec)
        else:
            opts["public_key"] = public_pem(keys.ed)
    folder = str(tmp_path) if tmp_path is not None else "."
    return JwtAuth(JwtOptions.model_validate(opts), PluginContext(clock=FakeClock(), folder=folder))


@contextlib.asynccontextmanager
async def jwks_plugin(url: str, clock: FakeClock, **options: Any) -> AsyncIterator[JwtAuth]:
    context = PluginContext(clock=clock)
    plugin = JwtAuth(JwtOptions.model_validate(corpus_options(url, **options)), context)
    try:
        yield plugin
    finally:
        for closer in context.resources:
            await closer()


def assert_unauthenticated(req: ProxyRequest) -> None:
    assert req.consumer is None
    assert req.claims is None
    for name in IDENTITY:
        assert name not in req.headers, f"{name} reached the upstream of a refused request"


def assert_accepted(reply: Reply | None, req: ProxyRequest, consumer: str = "alice") -> None:
    assert reply is None, f"refused: {message(reply)}"
    assert req.consumer == consumer
    assert req.claims is not None
    assert req.claims["sub"] == consumer
    assert req.headers.get_all("x-consumer-id") == [consumer]


# ------------------------------------------------------------------------------------------------ the corpus


def test_the_corpus_is_large_distinct_and_covers_the_classic_attacks(keys: Keys) -> None:
    corpus = attack_tokens(keys)
    descriptions = [description for description, _ in corpus]
    assert len(corpus) >= 40
    assert len(set(descriptions)) == len(descriptions)
    text = " | ".join(descriptions)
    for needle in (
        "alg none",
        "alg NONE",
        "alg nOnE",
        "RSA public key PEM",
        "JWKS JSON",
        "kid unknown",
        "kid missing",
        "path traversal",
        "SQL",
        "expired",
        "nbf",
        "iat an hour",
        "exp missing",
        "exp a string",
        "iss wrong",
        "aud wrong",
        "aud missing",
        "tampered payload",
        "tampered signature",
        "truncated signature",
        "empty signature",
        "attacker's RSA key",
        "RS384",
        "PS256",
        "ES256",
        "jku",
        "x5u",
        "jwk header",
        "crit",
        "huge token",
        "huge header",
        "invalid base64",
        "padding",
        "header not JSON",
        "payload not JSON",
        "payload a JSON array",
        "payload a JSON string",
        "payload a JSON number",
        "two segments",
        "four segments",
        "empty token",
        "newline",
        "Bearer with no token",
        "Basic",
        "unicode garbage",
    ):
        assert needle in text, f"the corpus has no {needle!r} case"


async def run_corpus(plugin: JwtAuth, corpus: list[tuple[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    failures: list[str] = []
    for description, authorization in corpus:
        req = spoofed(authorization)
        try:
            reply = await settle(plugin.request(req))
        except Exception as exc:
            failures.append(f"{description}: raised {exc!r}")
            continue
        if reply is None or reply.status != 401:
            failures.append(f"{description}: answered {reply.status if reply else 'pass'}")
            continue
        if not (reply.headers.get("www-authenticate") or "").startswith("Bearer"):
            failures.append(f"{description}: no Bearer challenge")
        token = authorization.partition(" ")[2] or authorization
        if len(token) > 16 and token in reply.body.decode("utf-8", "replace"):
            failures.append(f"{description}: the answer quotes the token")
        if req.consumer is not None or req.claims is not None or any(name in req.headers for name in IDENTITY):
            failures.append(f"{description}: the request carries an identity after a 401")
    assert not failures, "\n".join(failures)
    # every refusal was classified: none went through the catch-all for unexpected errors
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
    secrets = [value.partition(" ")[2] for _, value in corpus if len(value.partition(" ")[2]) > 16]
    for record in caplog.records:
        dump = str(record.__dict__)
        assert not any(secret in dump for secret in secrets), f"a log record quotes a token: {record.getMessage()}"


@pytest.mark.anyio
async def test_every_attack_token_is_refused_with_a_jwks(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with JwksServer(jwks_document(keys)) as server, jwks_plugin(server.url, FakeClock()) as plugin:
        control = request(f"Bearer {good_token(keys)}")
        assert_accepted(await settle(plugin.request(control)), control)
        await run_corpus(plugin, attack_tokens(keys), caplog)
        # the control again: the corpus left the plugin working
        after = request(f"Bearer {good_token(keys, kid=KID_RSA_NEXT, key=keys.rsa_next)}")
        assert_accepted(sync(plugin.request(after)), after)


@pytest.mark.anyio
async def test_every_attack_token_is_refused_with_a_static_key(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    plugin = static(keys)
    control = request(f"Bearer {good_token(keys)}")
    assert_accepted(sync(plugin.request(control)), control)
    # one static key ignores kid: the kid cases signed by that key are valid tokens here, not attacks
    corpus = [(d, v) for d, v in attack_tokens(keys) if not d.startswith("kid ")]
    assert len(corpus) >= 40
    await run_corpus(plugin, corpus, caplog)
    for _, authorization in corpus:
        assert not inspect.isawaitable(plugin.request(spoofed(authorization)))


# ------------------------------------------------------------------------------------------ good tokens


@pytest.mark.parametrize("alg", ["HS256", "HS512", "RS256", "PS256", "ES256", "EdDSA"])
def test_a_good_token_of_each_family_passes_and_forwards_the_identity(keys: Keys, alg: str) -> None:
    plugin = static(keys, alg)
    req = spoofed(f"Bearer {good_token(keys, alg)}")
    assert_accepted(sync(plugin.request(req)), req)
    assert req.claims is not None
    assert req.claims["iss"] == ISSUER
    assert "x-consumer-scopes" not in req.headers  # the token has no scopes: the client's copy is gone
    assert (req.headers.get("authorization") or "").startswith("Bearer ")  # kept unless strip_authorization


def test_a_token_for_one_family_fails_on_a_key_of_another(keys: Keys) -> None:
    plugin = static(keys, "ES256")
    for alg in ("RS256", "EdDSA", "HS256"):
        req = request(f"Bearer {good_token(keys, alg)}")
        reply = sync(plugin.request(req))
        assert reply is not None
        assert reply.status == 401
        assert_unauthenticated(req)


def test_public_key_file_is_resolved_against_the_config_folder(keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "issuer.pem").write_text(public_pem(keys.ec))
    plugin = static(keys, "ES256", tmp_path, public_key_file="keys/issuer.pem")
    req = request(f"Bearer {good_token(keys, 'ES256')}")
    assert_accepted(sync(plugin.request(req)), req)


def test_public_key_may_be_a_certificate(keys: Keys) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.meshkit.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.rsa.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(keys.rsa, hashes.SHA256())
    )
    plugin = static(keys, public_key=cert.public_bytes(serialization.Encoding.PEM).decode())
    req = request(f"Bearer {good_token(keys)}")
    assert_accepted(sync(plugin.request(req)), req)


def test_secret_env_reads_the_secret_from_the_environment(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHKIT_TEST_JWT_SECRET", keys.hmac_secret.decode())
    plugin = static(keys, "HS256", secret_env="MESHKIT_TEST_JWT_SECRET")
    req = request(f"Bearer {good_token(keys, 'HS256')}")
    assert_accepted(sync(plugin.request(req)), req)
    wrong = request(f"Bearer {good_token(keys, 'HS256', key=b'another-secret-of-more-than-32-bytes!!')}")
    assert sync(plugin.request(wrong)) is not None


def test_the_scheme_is_case_insensitive_and_extra_spaces_are_allowed(keys: Keys) -> None:
    plugin = static(keys)
    for prefix in ("bearer ", "BEARER ", "Bearer   "):
        req = request(prefix + good_token(keys))
        assert_accepted(sync(plugin.request(req)), req)


# ------------------------------------------------------------------------------------ verified-token cache


class DecodeCounter:
    """Counts PyJWT verifications (a spy around the real decode: the plugin still verifies for real)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.PyJWT.decode

        def counting(decoder: jwt.PyJWT, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(decoder, *args, **kwargs)

        monkeypatch.setattr(jwt.PyJWT, "decode", counting)


def test_a_verified_token_is_remembered_until_it_expires(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    plugin = static(keys, leeway=5, scopes=["read"])
    exp = int(time.time()) + 100
    token = good_token(keys, claims={"exp": exp, "scope": "read"})
    for n in range(4):
        req = spoofed(f"Bearer {token}")
        assert_accepted(sync(plugin.request(req)), req)
        assert req.headers.get_all("x-consumer-scopes") == ["read"]
        assert req.claims is not None
        req.claims["sub"] = f"changed-{n}"  # a later plugin scribbling on the claims changes no cached entry
    assert counter.calls == 1
    # a tampered copy of the remembered token is not the same token
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert sync(plugin.request(request(f"Bearer {tampered}"))) is not None
    assert counter.calls == 2
    # within exp + leeway (on the wall clock the plugin reads) the entry serves; past it, the token is verified again
    # (times from exp itself: "now + 104" raced the second that int() cut off exp on a slow machine)
    plugin._wall = lambda: exp + 5 - 1.0
    assert_accepted(sync(plugin.request(req := request(f"Bearer {token}"))), req)
    assert counter.calls == 2
    plugin._wall = lambda: exp + 5 + 1.0
    assert_accepted(sync(plugin.request(req := request(f"Bearer {token}"))), req)  # PyJWT's clock: still valid
    assert counter.calls == 3


def test_the_cache_is_bounded_and_can_be_disabled(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    plugin = static(keys, cache_size=2)
    a, b, c = (good_token(keys, claims={"n": n}) for n in range(3))
    for token in (a, b, c, c, b):  # a is the least recently used when c arrives
        assert sync(plugin.request(request(f"Bearer {token}"))) is None
    assert counter.calls == 3
    assert sync(plugin.request(request(f"Bearer {a}"))) is None
    assert counter.calls == 4
    uncached = static(keys, cache_size=0)
    for _ in range(3):
        assert sync(uncached.request(request(f"Bearer {a}"))) is None
    assert counter.calls == 7


def test_refused_tokens_are_not_remembered(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    plugin = static(keys, scopes=["admin"])
    token = good_token(keys)
    for _ in range(3):
        reply = sync(plugin.request(req := spoofed(f"Bearer {token}")))
        assert reply is not None
        assert reply.status == 403
        assert_unauthenticated(req)
    assert counter.calls == 3


# ----------------------------------------------------------------------------------------- time and claims


def test_leeway_accepts_small_clock_skew_only(keys: Keys) -> None:
    now = int(time.time())
    lenient, strict = static(keys), static(keys, leeway=0)
    expired = good_token(keys, claims={"exp": now - 10})
    early = good_token(keys, claims={"nbf": now + 10})
    for token in (expired, early):
        req = request(f"Bearer {token}")
        assert_accepted(sync(lenient.request(req)), req)
    assert message(sync(strict.request(request(f"Bearer {expired}")))) == "the token has expired"
    assert message(sync(strict.request(request(f"Bearer {early}")))) == "the token is not valid yet"
    too_late = good_token(keys, claims={"exp": now - 60})
    assert message(sync(lenient.request(request(f"Bearer {too_late}")))) == "the token has expired"


def test_exp_is_required_unless_require_exp_is_false(keys: Keys) -> None:
    payload = {k: v for k, v in good_claims().items() if k != "exp"}
    token = compact({"alg": "RS256", "kid": KID_RSA}, payload, signer(keys.rsa, "RS256"))
    assert message(sync(static(keys).request(request(f"Bearer {token}")))) == "the token has no 'exp' claim"
    req = request(f"Bearer {token}")
    assert_accepted(sync(static(keys, require_exp=False).request(req)), req)
    # other required claims
    plugin = static(keys, require=["exp", "jti"])
    assert message(sync(plugin.request(request(f"Bearer {good_token(keys)}")))) == "the token has no 'jti' claim"
    req = request(f"Bearer {good_token(keys, claims={'jti': 'j-1'})}")
    assert_accepted(sync(plugin.request(req)), req)


def test_audience_may_be_a_list_and_issuer_mismatch_is_401(keys: Keys) -> None:
    plugin = static(keys, audience=["web", AUDIENCE])
    req = request(f"Bearer {good_token(keys)}")
    assert_accepted(sync(plugin.request(req)), req)
    other = good_token(keys, issuer="https://another-issuer.test/")
    reply = sync(plugin.request(request(f"Bearer {other}")))
    assert reply is not None
    assert reply.status == 401
    assert message(reply) == "the token's issuer is not accepted"


def test_missing_scopes_answer_403_with_insufficient_scope(keys: Keys) -> None:
    plugin = static(keys, scopes=["orders:read", "orders:write"])
    cases: dict[str, dict[str, Any]] = {
        "scope string": {"scope": "orders:read orders:write profile"},
        "scp list": {"scp": ["orders:write", "orders:read"]},
        "scp string": {"scp": "orders:read orders:write"},
        "split across scope and scp": {"scope": "orders:read", "scp": ["orders:write"]},
    }
    for description, claims in cases.items():
        req = spoofed(f"Bearer {good_token(keys, claims=claims)}")
        assert sync(plugin.request(req)) is None, description
        granted = set((req.headers.get("x-consumer-scopes") or "").split())
        assert {"orders:read", "orders:write"} <= granted, description
        assert req.headers.get_all("x-consumer-scopes") == [req.headers.get("x-consumer-scopes")]
    for claims in ({"scope": "orders:read"}, {}, {"scp": ["orders:read orders:write"]}, {"scope": ["x"]}):
        req = spoofed(f"Bearer {good_token(keys, claims=claims)}")
        reply = sync(plugin.request(req))
        assert reply is not None
        assert reply.status == 403, claims
        assert reply.headers.get("www-authenticate") == 'Bearer error="insufficient_scope"'
        assert "orders:write" in message(reply)
        assert_unauthenticated(req)


def test_required_claim_values_answer_403_when_they_differ(keys: Keys) -> None:
    plugin = static(keys, claims={"tenant": "acme", "role": ["admin", "ops"], "verified": True})
    ok = {"tenant": "acme", "role": "ops", "verified": True}
    req = request(f"Bearer {good_token(keys, claims=ok)}")
    assert_accepted(sync(plugin.request(req)), req)
    req = request(f"Bearer {good_token(keys, claims={**ok, 'role': ['viewer', 'admin']})}")
    assert_accepted(sync(plugin.request(req)), req)
    for changes in ({"tenant": "evil"}, {"role": "viewer"}, {"role": ["viewer"]}, {"verified": 1}, {"tenant": None}):
        req = spoofed(f"Bearer {good_token(keys, claims={**ok, **changes})}")
        reply = sync(plugin.request(req))
        assert reply is not None
        assert reply.status == 403, changes
        assert "claim is not accepted" in message(reply)
        assert_unauthenticated(req)


# ------------------------------------------------------------------------------------------ headers


def test_missing_token_gets_a_challenge_without_error(keys: Keys) -> None:
    req = spoofed()
    reply = sync(static(keys).request(req))
    assert reply is not None
    assert reply.status == 401
    assert message(reply) == "a bearer token is required"
    assert reply.headers.get("www-authenticate") == 'Bearer realm="meshkit"'
    assert reply.headers.get("content-type") == "application/json"
    assert_unauthenticated(req)


def test_invalid_tokens_get_the_invalid_token_challenge(keys: Keys) -> None:
    reply = sync(static(keys).request(request("Bearer a.b.c")))
    assert reply is not None
    assert reply.headers.get("www-authenticate") == 'Bearer error="invalid_token"'


def test_client_identity_headers_are_stripped_on_success_and_failure(keys: Keys) -> None:
    plugin = static(keys, forward={"sub": "x-consumer-id", "email": "x-user-email"})
    for authorization in (None, "Basic Zm9vOmJhcg==", "Bearer nope", f"Bearer {good_token(keys, alg='RS384')}"):
        req = request(
            authorization, ("x-consumer-id", "admin"), ("X-User-Email", "ceo@corp"), ("x-consumer-scopes", "*")
        )
        assert sync(plugin.request(req)) is not None
        assert_unauthenticated(req)
        assert "x-user-email" not in req.headers
    req = request(
        f"Bearer {good_token(keys, claims={'email': 'alice@example.com'})}",
        ("x-consumer-id", "admin"),
        ("x-user-email", "ceo@corp"),
        ("x-consumer-id", "root"),
    )
    assert_accepted(sync(plugin.request(req)), req)
    assert req.headers.get_all("x-user-email") == ["alice@example.com"]


def test_forwarded_values_are_header_safe(keys: Keys) -> None:
    plugin = static(keys, forward={"sub": "x-consumer-id", "name": "x-user-name", "level": "x-level", "ok": "x-ok"})
    req = request(f"Bearer {good_token(keys, claims={'name': 'Zoë 李', 'level': 3, 'ok': True})}")
    assert_accepted(sync(plugin.request(req)), req)
    assert req.headers.get("x-user-name") == "Zo%C3%AB%20%E6%9D%8E"
    assert req.headers.get("x-level") == "3"
    assert req.headers.get("x-ok") == "true"
    injected = good_token(keys, claims={"name": "x\r\nx-consumer-id: admin"})
    req = spoofed(f"Bearer {injected}")
    reply = sync(plugin.request(req))
    assert reply is not None
    assert reply.status == 401
    assert_unauthenticated(req)


def test_x_consumer_id_is_stripped_even_when_not_forwarded(keys: Keys) -> None:
    plugin = static(keys, forward={})
    req = spoofed(f"Bearer {good_token(keys)}")
    assert sync(plugin.request(req)) is None
    assert req.consumer == "alice"
    assert "x-consumer-id" not in req.headers
    assert "x-consumer-scopes" not in req.headers


def test_consumer_claim_and_strip_authorization(keys: Keys) -> None:
    plugin = static(keys, consumer_claim="client_id", forward={"client_id": "x-client"}, strip_authorization=True)
    req = request(f"Bearer {good_token(keys, claims={'client_id': 'billing'})}")
    assert sync(plugin.request(req)) is None
    assert req.consumer == "billing"
    assert req.headers.get("x-client") == "billing"
    assert "authorization" not in req.headers
    reply = sync(plugin.request(request(f"Bearer {good_token(keys)}")))
    assert message(reply) == "the token has no 'client_id' claim naming the caller"


def test_a_custom_header_and_token_size_limit(keys: Keys) -> None:
    plugin = static(keys, header="x-token", max_token_bytes=1024)
    req = request(None, ("x-token", f"Bearer {good_token(keys)}"))
    assert_accepted(sync(plugin.request(req)), req)
    assert message(sync(plugin.request(request(f"Bearer {good_token(keys)}")))) == "a bearer token is required"
    big = good_token(keys, claims={"pad": "x" * 1024})
    reply = sync(plugin.request(request(None, ("x-token", f"Bearer {big}"))))
    assert message(reply) == "the token is larger than 1024 bytes"
    twice = request(None, ("x-token", f"Bearer {good_token(keys)}"), ("x-token", "Bearer x.y.z"))
    assert sync(plugin.request(twice)) is not None
    assert_unauthenticated(twice)


def test_the_yaml_examples_in_the_docs_are_valid_options() -> None:
    yaml = pytest.importorskip("yaml")
    doc = Path(__file__).resolve().parents[2] / "docs" / "gateway-auth.md"
    blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.S)
    found: dict[str, int] = {"jwt": 0, "api_key": 0}
    models: dict[str, type[BaseModel]] = {"jwt": JwtOptions, "api_key": ApiKeyOptions}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if len(node) == 1 and next(iter(node)) in found and isinstance(next(iter(node.values())), dict):
                name, options = next(iter(node.items()))
                models[name].model_validate(options)
                found[name] += 1
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for block in blocks:
        walk(yaml.safe_load(block))
    assert found["jwt"] >= 4
    assert found["api_key"] >= 2


def test_only_the_request_hook_is_overridden() -> None:
    for cls in (JwtAuth, ApiKeyAuth):
        assert cls.overrides("request")
        for hook in ("response", "request_body", "response_body", "done"):
            assert not cls.overrides(hook)
    assert JwtAuth.name == "jwt"
    assert ApiKeyAuth.name == "api_key"
    assert JwtAuth.Options is JwtOptions
    assert ApiKeyAuth.Options is ApiKeyOptions


# ------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"algorithms": ["none"], "secret": "s" * 32}, "'none' cannot be allowed"),
        ({"algorithms": ["RS256", "None"], "public_key": "x"}, "'none' cannot be allowed"),
        ({"algorithms": ["NONE"], "public_key": "x"}, "'none' cannot be allowed"),
        ({"algorithms": ["HS256", "RS256"], "secret": "s" * 32}, "key-confusion"),
        ({"algorithms": ["ES256", "HS512"], "jwks_url": "https://id.test/jwks"}, "key-confusion"),
        ({"algorithms": ["RS256"]}, "no key source"),
        ({"algorithms": ["RS256"], "public_key": "x", "jwks_url": "https://id.test/jwks"}, "several key sources"),
        ({"algorithms": ["HS256"], "secret": "s" * 32, "secret_env": "X"}, "several key sources"),
        ({"algorithms": ["RS256"], "secret": "s" * 32}, "must be HS256"),
        ({"algorithms": ["HS256"], "public_key": "x"}, "never HS*"),
        ({"algorithms": ["HS256"], "jwks_url": "https://id.test/jwks"}, "never HS*"),
        ({"algorithms": ["RS999"], "public_key": "x"}, "unknown algorithm"),
        ({"algorithms": [], "public_key": "x"}, "at least 1"),
        ({"algorithms": ["RS256"], "jwks_url": "http://id.example.com/jwks"}, "plain http"),
        ({"algorithms": ["RS256"], "jwks_url": "ftp://id.example.com/jwks"}, "http(s) URL"),
        ({"algorithms": ["RS256"], "public_key": "x", "forward": {"sub": "content-length"}}, "frames or routes"),
        ({"algorithms": ["RS256"], "public_key": "x", "forward": {"sub": "x-consumer-scopes"}}, "x-consumer-scopes"),
        ({"algorithms": ["RS256"], "public_key": "x", "forward": {"a": "x-a", "b": "X-A"}}, "same header"),
        ({"algorithms": ["RS256"], "public_key": "x", "header": "x-consumer-id"}, "identity header"),
        ({"algorithms": ["RS256"], "public_key": "x", "scopes": ["a b"]}, "without spaces"),
        ({"algorithms": ["RS256"], "public_key": "x", "header": "x-consumer-scopes"}, "identity header"),
        ({"algorithms": ["RS256"], "public_key": "x", "audience": []}, "audience must be"),
        ({"algorithms": ["RS256"], "public_key": "x", "audience": ""}, "audience must be"),
        ({"algorithms": ["RS256"], "public_key": "x", "claims": {"role": []}}, "no token could pass"),
        ({"algorithms": ["RS256"], "public_key": "x", "require": ["exp"], "require_exp": False}, "choose one"),
        ({"algorithms": ["RS256"], "public_key": "x", "issuer_url": "typo"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_options_are_refused_at_load(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        JwtOptions.model_validate(options)
    assert expected in str(info.value)


def test_durations_may_be_written_with_units() -> None:
    options = JwtOptions.model_validate(
        {"algorithms": ["RS256"], "jwks_url": "https://id.test/jwks", "leeway": "1m", "jwks_cache_seconds": "5m"}
    )
    assert options.leeway == 60
    assert options.jwks_cache_seconds == 300
    assert options.jwks_min_refresh_seconds == 10
    with pytest.raises(ValidationError, match="not a duration"):
        JwtOptions.model_validate({"algorithms": ["RS256"], "jwks_url": "https://id.test/jwks", "leeway": "soon"})


def test_http_jwks_is_allowed_on_loopback_or_when_asked() -> None:
    JwtOptions.model_validate({"algorithms": ["RS256"], "jwks_url": "http://127.0.0.1:8080/jwks"})
    JwtOptions.model_validate({"algorithms": ["RS256"], "jwks_url": "http://idp:8080/jwks", "jwks_allow_http": True})


def test_bad_keys_are_refused_when_the_plugin_is_built(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHKIT_TEST_UNSET_SECRET", raising=False)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_pem = keys.rsa.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"algorithms": ["HS256"], "secret_env": "MESHKIT_TEST_UNSET_SECRET"}, "is not set"),
        ({"algorithms": ["HS256"], "secret": "short"}, "needs at least 32"),
        ({"algorithms": ["HS512"], "secret": "s" * 40}, "needs at least 64"),
        ({"algorithms": ["HS256"], "secret": public_pem(keys.rsa)}, "cannot be an HMAC secret"),
        ({"algorithms": ["RS256"], "public_key": public_pem(keys.ec)}, "allows only RS256"),
        ({"algorithms": ["ES384"], "public_key": public_pem(keys.ec)}, "EC secp256r1"),
        ({"algorithms": ["RS256"], "public_key": public_pem(weak)}, "1024 bits"),
        ({"algorithms": ["RS256"], "public_key": "not a key"}, "not a PEM public key"),
        ({"algorithms": ["RS256"], "public_key": private_pem}, "not a PEM public key"),
        ({"algorithms": ["RS256"], "public_key_file": "missing.pem"}, "cannot be read"),
    ]
    for options, expected in cases:
        with pytest.raises(ConfigurationError) as info:
            JwtAuth(options, PluginContext(clock=FakeClock(), folder=str(tmp_path)))
        assert expected in str(info.value), options


# --------------------------------------------------------------------------------------------------- JWKS


@pytest.mark.anyio
async def test_jwks_first_fetch_is_async_then_answers_synchronously(keys: Keys) -> None:
    clock = FakeClock()
    async with JwksServer(jwks_document(keys)) as server, jwks_plugin(server.url, clock) as plugin:
        first = request(f"Bearer {good_token(keys)}")
        result = plugin.request(first)
        assert inspect.isawaitable(result)
        assert_accepted(await settle(result), first)
        assert server.hits == 1
        for kid, key in ((KID_RSA, keys.rsa), (KID_RSA_NEXT, keys.rsa_next)):
            req = spoofed(f"Bearer {good_token(keys, kid=kid, key=key)}")
            assert_accepted(sync(plugin.request(req)), req)
        clock.advance(299)
        req = request(f"Bearer {good_token(keys)}")
        assert_accepted(sync(plugin.request(req)), req)
        assert server.hits == 1
        clock.advance(2)  # past jwks_cache_seconds: the next request refetches
        result = plugin.request(req := request(f"Bearer {good_token(keys)}"))
        assert inspect.isawaitable(result)
        assert_accepted(await settle(result), req)
        assert server.hits == 2


@pytest.mark.anyio
async def test_jwks_key_rotation_is_picked_up_by_one_refetch(keys: Keys) -> None:
    clock = FakeClock()
    async with JwksServer(jwks_document(keys, "rsa")) as server, jwks_plugin(server.url, clock) as plugin:
        first = good_token(keys)
        req = request(f"Bearer {first}")
        assert_accepted(await settle(plugin.request(req)), req)
        req = request(f"Bearer {first}")
        assert_accepted(sync(plugin.request(req)), req)  # verified, and remembered
        server.document = jwks_document(keys, "rsa_next")  # the issuer rotates: rsa-1 is gone, rsa-2 is new
        clock.advance(10)
        rotated = good_token(keys, kid=KID_RSA_NEXT, key=keys.rsa_next)
        result = plugin.request(req := request(f"Bearer {rotated}"))
        assert inspect.isawaitable(result)
        assert_accepted(await settle(result), req)
        assert server.hits == 2
        req = request(f"Bearer {rotated}")
        assert_accepted(sync(plugin.request(req)), req)
        # the retired key no longer verifies, and asking again within the budget costs no fetch
        old = request(f"Bearer {first}")  # the very token verified (and remembered) before the rotation
        assert message(sync(plugin.request(old))) == "the token's key id (kid) is unknown"
        assert server.hits == 2


@pytest.mark.anyio
async def test_unknown_kids_cause_at_most_one_fetch_per_interval(keys: Keys) -> None:
    clock = FakeClock()
    async with JwksServer(jwks_document(keys)) as server, jwks_plugin(server.url, clock) as plugin:
        assert await settle(plugin.request(request(f"Bearer {good_token(keys)}"))) is None
        clock.advance(10)
        fetched = 0
        for n in range(50):
            result = plugin.request(req := request(f"Bearer {good_token(keys, kid=f'random-{n}')}"))
            fetched += inspect.isawaitable(result)
            reply = await settle(result)
            assert message(reply) == "the token's key id (kid) is unknown"
            assert_unauthenticated(req)
            clock.advance(0.1)
        assert fetched == 1
        assert server.hits == 2
        clock.advance(10)
        tokens = [good_token(keys, kid=f"burst-{n}") for n in range(20)]
        replies = await asyncio.gather(*(settle(plugin.request(request(f"Bearer {t}"))) for t in tokens))
        assert all(reply is not None and reply.status == 401 for reply in replies)
        assert server.hits == 3
        # known keys kept answering synchronously all along
        req = request(f"Bearer {good_token(keys)}")
        assert_accepted(sync(plugin.request(req)), req)


@pytest.mark.anyio
async def test_concurrent_first_requests_share_one_fetch(keys: Keys) -> None:
    async with JwksServer(jwks_document(keys)) as server, jwks_plugin(server.url, FakeClock()) as plugin:
        server.hold()
        reqs = [request(f"Bearer {good_token(keys, claims={'n': n})}") for n in range(25)]
        results = [plugin.request(req) for req in reqs]
        assert all(inspect.isawaitable(result) for result in results)

        async def settled(result: RequestResult) -> Reply | None:
            return await settle(result)

        tasks = [asyncio.ensure_future(settled(result)) for result in results]
        # the tasks were scheduled before the fetch they started: all of them have joined it by now
        await eventually(lambda: server.hits == 1, "the first JWKS fetch to reach the server")
        server.release()
        replies = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert replies == [None] * 25
        assert all(req.consumer == "alice" for req in reqs)
        assert server.hits == 1


@pytest.mark.anyio
async def test_a_client_going_away_does_not_cancel_the_shared_fetch(keys: Keys) -> None:
    async with JwksServer(jwks_document(keys)) as server, jwks_plugin(server.url, FakeClock()) as plugin:
        server.hold()
        first = plugin.request(request(f"Bearer {good_token(keys)}"))
        second = plugin.request(req := request(f"Bearer {good_token(keys)}"))
        assert isinstance(first, Awaitable)
        assert isinstance(second, Awaitable)
        gone = asyncio.ensure_future(settle(first))
        stays = asyncio.ensure_future(settle(second))
        await eventually(lambda: server.hits == 1, "the JWKS fetch to start")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        server.release()
        assert_accepted(await asyncio.wait_for(stays, 30), req)
        assert server.hits == 1


@pytest.mark.anyio
async def test_jwks_endpoint_down_keeps_serving_cached_keys(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    server = await JwksServer(jwks_document(keys)).start()
    async with jwks_plugin(server.url, clock) as plugin:
        try:
            req = request(f"Bearer {good_token(keys)}")
            assert_accepted(await settle(plugin.request(req)), req)
            server.status = 503
            clock.advance(301)  # the cache expired: the refetch fails, the cached keys keep serving
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                req = request(f"Bearer {good_token(keys)}")
                assert_accepted(await settle(plugin.request(req)), req)
            assert any("JWKS fetch failed" in r.getMessage() for r in caplog.records)
            assert server.hits == 2
            req = request(f"Bearer {good_token(keys)}")
            assert_accepted(sync(plugin.request(req)), req)  # within the refetch budget: no new fetch
            unknown = request(f"Bearer {good_token(keys, kid='rsa-9')}")
            assert message(sync(plugin.request(unknown))) == "the token's key id (kid) is unknown"
            await server.close()  # now nothing listens at all
            clock.advance(10)
            req = request(f"Bearer {good_token(keys)}")
            assert_accepted(await settle(plugin.request(req)), req)
            clock.advance(10)
            reply = await settle(plugin.request(request(f"Bearer {good_token(keys, kid='rsa-9')}")))
            assert message(reply) == "the token's key id (kid) is unknown"
        finally:
            await server.close()


@pytest.mark.anyio
async def test_jwks_down_from_the_start_is_401_not_500(keys: Keys) -> None:
    clock = FakeClock()
    server = await JwksServer(jwks_document(keys)).start()
    url = server.url
    await server.close()
    async with jwks_plugin(url, clock) as plugin:
        result = plugin.request(req := spoofed(f"Bearer {good_token(keys)}"))
        assert inspect.isawaitable(result)
        reply = await settle(result)
        assert reply is not None
        assert reply.status == 401
        assert message(reply) == "the signing keys are unavailable; try again later"
        assert_unauthenticated(req)
        # within the refetch budget: refused at once, no new connection attempt
        assert sync(plugin.request(request(f"Bearer {good_token(keys)}"))) is not None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("document", "status"),
    [({"keys": "nope"}, 200), (["not", "an", "object"], 200), ({"error": "x"}, 500)],
)
async def test_a_broken_jwks_document_is_a_failed_fetch(keys: Keys, document: Any, status: int) -> None:
    async with JwksServer(document) as server, jwks_plugin(server.url, FakeClock()) as plugin:
        server.status = status
        reply = await settle(plugin.request(request(f"Bearer {good_token(keys)}")))
        assert message(reply) == "the signing keys are unavailable; try again later"


@pytest.mark.anyio
async def test_jwks_keys_are_filtered_by_type_use_and_alg(keys: Keys) -> None:
    hmac_jwk = {"kty": "oct", "kid": "oct-1", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}
    private_jwk = {**RSAAlgorithm.to_jwk(keys.rsa_next, as_dict=True), "kid": "with-private"}
    document = {
        "keys": [
            hmac_jwk,
            {**public_jwk(keys.rsa, "enc-1"), "use": "enc"},
            {**public_jwk(keys.rsa, "rs512-only"), "alg": "RS512"},
            public_jwk(keys.ec, "ec-1"),
            public_jwk(keys.rsa, KID_RSA),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not an object",
            private_jwk,
        ]
    }
    async with JwksServer(document) as server, jwks_plugin(server.url, FakeClock()) as plugin:
        req = request(f"Bearer {good_token(keys)}")
        assert_accepted(await settle(plugin.request(req)), req)
        for kid in ("oct-1", "enc-1", "rs512-only", "ec-1", "broken"):
            reply = sync(plugin.request(request(f"Bearer {good_token(keys, kid=kid)}")))
            assert reply is not None
            assert reply.status == 401, kid
        hs = compact({"alg": "HS256", "kid": "oct-1"}, good_claims(), signer(b"secret" * 8, "HS256"))
        assert sync(plugin.request(request(f"Bearer {hs}"))) is not None
        # a JWKS that publishes a private key by mistake: only its public half is used
        req = request(f"Bearer {good_token(keys, kid='with-private', key=keys.rsa_next)}")
        assert_accepted(sync(plugin.request(req)), req)


@pytest.mark.anyio
async def test_jwks_with_ec_and_ed25519_keys_and_a_lone_key_without_kid(keys: Keys) -> None:
    async with JwksServer(jwks_document(keys, "ec", "ed")) as server:
        async with jwks_plugin(server.url, FakeClock(), algorithms=["ES256", "EdDSA"]) as plugin:
            for alg in ("ES256", "EdDSA"):
                req = request(f"Bearer {good_token(keys, alg)}")
                assert_accepted(await settle(plugin.request(req)), req)
            reply = sync(plugin.request(request(f"Bearer {good_token(keys, 'ES256', kid=None)}")))
            assert message(reply) == "the token has no key id (kid) and there are several keys"
            reply = sync(plugin.request(request(f"Bearer {good_token(keys, 'RS256')}")))
            assert message(reply) == "the token's algorithm is not accepted"
        # one plugin allowing two key types: each key verifies only its own type's algorithms
        server.document = jwks_document(keys, "rsa", "ec")
        async with jwks_plugin(server.url, FakeClock(), algorithms=["RS256", "ES256"]) as plugin:
            for alg in ("RS256", "ES256"):
                req = request(f"Bearer {good_token(keys, alg)}")
                assert_accepted(await settle(plugin.request(req)), req)
            crossed = good_token(keys, "RS256", kid="ec-1")
            reply = sync(plugin.request(request(f"Bearer {crossed}")))
            assert message(reply) == "the token's algorithm is not accepted for its key"
        server.document = {"keys": [public_jwk(keys.ec, None)]}
        async with jwks_plugin(server.url, FakeClock(), algorithms=["ES256"]) as plugin:
            req = request(f"Bearer {good_token(keys, 'ES256', kid=None)}")
            assert_accepted(await settle(plugin.request(req)), req)


@pytest.mark.anyio
async def test_closing_stops_fetching(keys: Keys) -> None:
    clock = FakeClock()
    async with JwksServer(jwks_document(keys)) as server:
        context = PluginContext(clock=clock)
        plugin = JwtAuth(corpus_options(server.url), context)
        assert len(context.resources) == 1
        req = request(f"Bearer {good_token(keys)}")
        assert_accepted(await settle(plugin.request(req)), req)
        for closer in context.resources:
            await closer()
        clock.advance(400)
        reply = await settle(plugin.request(request(f"Bearer {good_token(keys, kid='new')}")))
        assert reply is not None
        assert reply.status == 401
        assert server.hits == 1
    context = PluginContext(clock=clock)
    JwtAuth({"algorithms": ["RS256"], "public_key": public_pem(keys.rsa)}, context)
    assert context.resources == []  # a static key holds nothing to close


# ----------------------------------------------------------------------------------------------- API keys


def api_plugin(**options: Any) -> ApiKeyAuth:
    defaults: dict[str, Any] = {
        "keys": [
            {"name": "acme", "hash": hash_api_key("acme-key-1"), "scopes": ["partners:read"]},
            {"name": "acme", "hash": hash_api_key("acme-key-2"), "scopes": ["partners:read"]},
            {"name": "globex", "hash": hash_api_key("globex-key"), "scopes": ["partners:read", "partners:write"]},
            {"name": "initech", "hash": hash_api_key("initech-key")},
        ]
    }
    return ApiKeyAuth(ApiKeyOptions.model_validate({**defaults, **options}), PluginContext(clock=FakeClock()))


def api_request(*headers: tuple[str, str], query: str = "") -> ProxyRequest:
    return request(None, ("x-consumer-id", "admin"), ("x-consumer-scopes", "*"), *headers, query=query)


def test_hash_api_key() -> None:
    digest = hash_api_key("abc")  # the FIPS 180-2 test vector
    assert digest == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_api_key("abc ") != digest
    with pytest.raises(ValueError, match="empty"):
        hash_api_key("")
    first, second = new_api_key(), new_api_key()
    assert first != second
    assert len(first) >= 40
    assert hash_api_key(first).startswith("sha256:")


def test_a_known_key_is_accepted_and_removed_before_forwarding() -> None:
    plugin = api_plugin()
    for key, name in (("acme-key-1", "acme"), ("acme-key-2", "acme"), ("globex-key", "globex")):
        req = api_request(("x-api-key", key))
        assert sync(plugin.request(req)) is None
        assert req.consumer == name
        assert req.headers.get_all("x-consumer-id") == [name]
        assert "x-api-key" not in req.headers
    assert req.headers.get_all("x-consumer-scopes") == ["partners:read partners:write"]
    req = api_request(("x-api-key", "initech-key"))
    assert sync(plugin.request(req)) is None
    assert "x-consumer-scopes" not in req.headers
    kept = api_plugin(strip_key=False)
    req = api_request(("x-api-key", "initech-key"))
    assert sync(kept.request(req)) is None
    assert req.headers.get("x-api-key") == "initech-key"


def test_unknown_and_missing_keys_are_401() -> None:
    plugin = api_plugin()
    cases = [
        (api_request(), "an API key is required"),
        (api_request(("x-api-key", "")), "an API key is required"),
        (api_request(("x-api-key", "acme-key-3")), "the API key is not valid"),
        (api_request(("x-api-key", hash_api_key("acme-key-1"))), "the API key is not valid"),
        (api_request(("x-api-key", "ACME-KEY-1")), "the API key is not valid"),
        (api_request(("authorization", "Bearer acme-key-1")), "an API key is required"),
        (api_request(("x-api-key", "acme-key-1"), ("x-api-key", "globex-key")), "send one x-api-key header, not 2"),
        (api_request(query="api_key=acme-key-1"), "an API key is required"),  # no query option
    ]
    for req, expected in cases:
        reply = sync(plugin.request(req))
        assert reply is not None
        assert reply.status == 401
        assert message(reply) == expected
        assert_unauthenticated(req)


def test_route_scopes_are_403_when_the_key_lacks_them() -> None:
    plugin = api_plugin(scopes=["partners:write"])
    req = api_request(("x-api-key", "acme-key-1"))
    reply = sync(plugin.request(req))
    assert reply is not None
    assert reply.status == 403
    assert message(reply) == "the API key lacks the scope(s): partners:write"
    assert_unauthenticated(req)
    req = api_request(("x-api-key", "globex-key"))
    assert sync(plugin.request(req)) is None
    assert req.consumer == "globex"


def test_the_key_may_come_in_a_query_parameter() -> None:
    plugin = api_plugin(query="api_key", header="x-partner-key")
    req = api_request(query="page=2&api_key=globex-key&sort=name%20asc")
    assert sync(plugin.request(req)) is None
    assert req.consumer == "globex"
    assert req.query == "page=2&sort=name%20asc"
    req = api_request(query="api%5Fkey=acme%2Dkey%2D1")
    assert sync(plugin.request(req)) is None
    assert req.consumer == "acme"
    assert req.query == ""
    req = api_request(("x-partner-key", "initech-key"), query="api_key=wrong")
    assert sync(plugin.request(req)) is None  # the header wins
    assert req.consumer == "initech"
    assert req.query == ""
    req = api_request(query="api_key=nope&x=1")
    assert message(sync(plugin.request(req))) == "the API key is not valid"
    assert_unauthenticated(req)


def test_api_key_options_are_checked_at_load() -> None:
    good = {"name": "acme", "hash": hash_api_key("k")}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"keys": []}, "at least 1"),
        ({"keys": [{"name": "acme", "hash": "my-plain-key"}]}, "never put the plain key"),
        ({"keys": [{"name": "acme", "hash": "sha256:abc"}]}, "64 hex digits"),
        ({"keys": [good, {**good, "name": "other"}]}, "the same hash"),
        ({"keys": [{**good, "name": "bad\nname"}]}, "name"),
        ({"keys": [{**good, "scopes": ["two words"]}]}, "without spaces"),
        ({"keys": [good], "header": "x-consumer-id"}, "identity header"),
        ({"keys": [good], "header": "bad header"}, "not a valid HTTP header name"),
        ({"keys": [good], "secret": "x"}, "Extra inputs are not permitted"),
    ]
    for options, expected in cases:
        with pytest.raises(ValidationError) as info:
            ApiKeyOptions.model_validate(options)
        assert expected in str(info.value), options


def test_api_key_hashes_are_normalised_to_lower_case() -> None:
    digest = hash_api_key("mixed-case")
    options = ApiKeyOptions.model_validate({"keys": [{"name": "m", "hash": "sha256:" + digest[7:].upper()}]})
    assert options.keys[0].hash == digest
    req = api_request(("x-api-key", "mixed-case"))
    assert sync(ApiKeyAuth(options).request(req)) is None
    assert req.consumer == "m"
