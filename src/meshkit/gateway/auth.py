"""Authentication plugins of the gateway: JWT bearer tokens (``jwt``) and API keys (``api_key``).

Both plugins answer on the gateway's fast path: they verify what the request carries, set ``req.consumer`` (and
``req.claims`` for tokens) and the identity headers the upstream reads, or answer ``401`` / ``403`` themselves::

    routes:
      - name: orders
        match: /api/orders
        plugins:
          - jwt:
              algorithms: [RS256]
              jwks_url: https://id.example.com/.well-known/jwks.json
              issuer: https://id.example.com/
              audience: orders-api
              scopes: [orders:read]
      - name: partners
        match: /partners
        plugins:
          - api_key:
              keys:
                - {name: acme, hash: "sha256:5e88...", scopes: [partners]}

What both guarantee:

- Identity headers a client sends (``x-consumer-id``, ``x-consumer-scopes`` and every header named in the JWT
  plugin's ``forward``) are removed before anything is checked, on every path: an upstream only ever sees identity
  headers the gateway set after a successful check.
- Failures answer ``401`` (no credentials, or credentials that do not verify) or ``403`` (verified, but missing a
  required scope or claim value); never a ``500``, whatever the client sends. Tokens and keys never appear in an
  answer or a log record.

JWT specifics (see :class:`JwtOptions`): the allowed ``algorithms`` are an explicit list; ``none`` is refused at
load and HMAC algorithms cannot be mixed with asymmetric ones in one plugin (that mix is what algorithm-confusion
attacks exploit). Each key admits only the algorithms of its own type (an RSA key never verifies an ``HS256``
token). With ``jwks_url`` the keys are fetched with aiohttp and cached: ``request`` stays synchronous while the
token's key is cached and returns an awaitable only when a fetch is needed (first use, an unknown ``kid`` within
the refresh budget, an expired cache); concurrent requests share one fetch; while the endpoint is down the cached
keys keep serving.

API keys are stored hashed (``sha256:<hex>``, from :func:`hash_api_key`): the plain key never appears in config.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar
from urllib.parse import quote, unquote_plus, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator

from meshkit.errors import ConfigurationError, MissingDependency
from meshkit.gateway.config import to_seconds
from meshkit.gateway.plugin import Headers, Plugin, PluginContext, ProxyRequest, Reply, RequestResult

try:
    import jwt
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
    from jwt.exceptions import InvalidJTIError, InvalidSubjectError
except ImportError as exc:  # pragma: no cover - the gateway extra installs PyJWT with cryptography
    raise MissingDependency("jwt", "gateway") from exc

if TYPE_CHECKING:
    import aiohttp
    from jwt.types import Options as _DecodeOptions

__all__ = [
    "ApiKeyAuth",
    "ApiKeyEntry",
    "ApiKeyOptions",
    "JwtAuth",
    "JwtOptions",
    "hash_api_key",
    "new_api_key",
]

logger = logging.getLogger(__name__)

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS_BY_CURVE: dict[str, frozenset[str]] = {
    "secp256r1": frozenset({"ES256"}),
    "secp384r1": frozenset({"ES384"}),
    "secp521r1": frozenset({"ES512", "ES521"}),
    "secp256k1": frozenset({"ES256K"}),
}
_EC_ALGORITHMS = frozenset[str]().union(*_EC_ALGORITHMS_BY_CURVE.values())
_OKP_ALGORITHMS = frozenset({"EdDSA"})
_ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS | _EC_ALGORITHMS | _OKP_ALGORITHMS
_KNOWN_ALGORITHMS = _HMAC_ALGORITHMS | _ASYMMETRIC_ALGORITHMS
#: HMAC secrets shorter than the hash output are brute-forceable (RFC 7518 section 3.2)
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA_MIN_BITS = 2048
_MAX_JWKS_BYTES = 1 << 20

#: headers whose client-sent copies are always removed (identity the gateway sets)
_CONSUMER_ID = "x-consumer-id"
_CONSUMER_SCOPES = "x-consumer-scopes"
_IDENTITY = (_CONSUMER_ID, _CONSUMER_SCOPES)
#: headers a plugin may never set: they frame the message or route it
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive"}
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
# compact JWS: three base64url segments (trailing '=' tolerated, as some issuers pad; PyJWT checks it strictly)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PRINTABLE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_MISSING = object()

ClaimValue = str | int | bool
#: seconds, or a duration string like the rest of the gateway's YAML (``"250ms"``, ``"30s"``, ``"5m"``)
_Seconds = Annotated[float, BeforeValidator(to_seconds)]


def _header_name(value: str, what: str) -> str:
    name = value.strip().lower()
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{what} {value!r} is not a valid HTTP header name")
    if name in _RESERVED_HEADERS:
        raise ValueError(f"{what} {value!r} is a header that frames or routes the request; it cannot be used")
    return name


def _scope_list(values: list[str], what: str) -> list[str]:
    for scope in values:
        if not scope or any(c.isspace() for c in scope):
            raise ValueError(f"{what}: scope {scope!r} must be a non-empty word without spaces")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------------------- JWT


def _credential(headers: Headers, name: str, identity: Collection[str]) -> tuple[str | None, int]:
    """The first value of the credential header ``name`` and how many there are, in one pass; the ``identity``
    headers a client sent are removed on the way (they are the gateway's to set, never the client's)."""
    value: str | None = None
    count = 0
    spoofed = False
    for key, item in headers.items():
        if key == name:
            count += 1
            if value is None:
                value = item
        elif key in identity:
            spoofed = True
    if spoofed:
        for strip in identity:
            headers.remove(strip)
    return value, count


class JwtOptions(BaseModel):
    """Options of the ``jwt`` plugin.

    - ``algorithms``: the allow-list (``[RS256]``, ``[ES256, EdDSA]``, ``[HS256]``). ``none`` is refused, and HMAC
      (``HS*``) cannot be mixed with asymmetric algorithms.
    - The key source, exactly one of: ``secret`` (HMAC), ``secret_env`` (the name of an environment variable
      holding the HMAC secret), ``public_key`` (PEM public key or certificate), ``public_key_file`` (a PEM file;
      relative to the config file's folder), ``jwks_url`` (a JWKS endpoint; ``https``, or ``http`` on loopback,
      unless ``jwks_allow_http``).
    - Durations are seconds or strings with a unit (``"30s"``, ``"5m"``).
      ``jwks_cache_seconds`` (300): how long fetched keys are used before refetching. ``jwks_min_refresh_seconds``
      (10): an unknown ``kid`` (a key rotation) triggers at most one refetch per this interval.
      ``jwks_timeout`` (5): seconds for one fetch.
    - ``issuer`` / ``audience`` (str or list): the accepted ``iss`` / ``aud``; when set, the claim is required.
      Without ``audience``, a token that carries an ``aud`` is refused (it was meant for someone specific).
    - ``leeway`` (30): seconds of clock skew accepted on ``exp`` / ``nbf`` / ``iat``.
    - ``require`` (``[exp]``): claims that must be present. ``exp`` is always required unless
      ``require_exp: false``.
    - ``scopes``: all must be in the token's ``scope`` (space-separated) or ``scp`` (list or string) claim, else 403.
    - ``claims``: claim -> required value or list of accepted values (a list claim matches when any of its items
      is accepted), else 403.
    - ``header`` (``authorization``) carrying ``Bearer <token>``; ``max_token_bytes`` (8192): longer tokens are
      refused unparsed; ``realm`` (``meshkit``): the realm of the ``WWW-Authenticate`` challenge.
    - ``forward`` (``{sub: x-consumer-id}``): claim -> header set for the upstream (values outside printable ASCII
      are sent percent-encoded as UTF-8); ``x-consumer-scopes`` carries the token's scopes. ``consumer_claim``
      (``sub``) names the claim that becomes ``req.consumer``. ``strip_authorization`` (false): remove the token's
      header before forwarding.
    - ``cache_size`` (1024): how many verified tokens are remembered (keyed by the whole token, until its ``exp``
      plus ``leeway``, and only while the keys that verified it are current), so a client that sends the same
      token again skips signature verification. 0 verifies every request.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithms: list[str] = Field(min_length=1)
    secret: SecretStr | None = None
    secret_env: str | None = None
    public_key: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    jwks_cache_seconds: _Seconds = Field(300.0, gt=0)
    jwks_min_refresh_seconds: _Seconds = Field(10.0, ge=0)
    jwks_timeout: _Seconds = Field(5.0, gt=0)
    jwks_allow_http: bool = False
    issuer: str | None = None
    audience: str | list[str] | None = None
    leeway: _Seconds = Field(30.0, ge=0)
    require: list[str] = Field(default_factory=lambda: ["exp"])
    require_exp: bool = True
    scopes: list[str] = Field(default_factory=list)
    claims: dict[str, ClaimValue | list[ClaimValue]] = Field(default_factory=dict)
    header: str = "authorization"
    realm: str = Field("meshkit", pattern=r"^[\x20-\x21\x23-\x5b\x5d-\x7e]*$")
    max_token_bytes: int = Field(8192, ge=64)
    forward: dict[str, str] = Field(default_factory=lambda: {"sub": _CONSUMER_ID})
    consumer_claim: str = Field("sub", min_length=1)
    strip_authorization: bool = False
    cache_size: int = Field(1024, ge=0)

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, value: list[str]) -> list[str]:
        for alg in value:
            if alg.strip().lower() == "none":
                raise ValueError("'none' cannot be allowed: unsigned tokens would pass as anyone")
            if alg not in _KNOWN_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}; known: {', '.join(sorted(_KNOWN_ALGORITHMS))}")
        hmac_algs = [a for a in value if a in _HMAC_ALGORITHMS]
        other = [a for a in value if a not in _HMAC_ALGORITHMS]
        if hmac_algs and other:
            raise ValueError(
                f"algorithms mixes HMAC ({', '.join(hmac_algs)}) with asymmetric ({', '.join(other)}) algorithms: "
                "a public key would then double as an HMAC secret (the key-confusion attack); "
                "use one jwt plugin per key type"
            )
        return list(dict.fromkeys(value))

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        return _header_name(value, "header")

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: list[str]) -> list[str]:
        return _scope_list(value, "scopes")

    @field_validator("audience")
    @classmethod
    def _check_audience(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and (not value or any(not aud for aud in ([value] if isinstance(value, str) else value))):
            raise ValueError("audience must be a non-empty string or list of non-empty strings")
        return value

    @field_validator("claims")
    @classmethod
    def _check_claims(cls, value: dict[str, Any]) -> dict[str, Any]:
        for claim, accepted in value.items():
            if isinstance(accepted, list) and not accepted:
                raise ValueError(f"claims.{claim}: the list of accepted values is empty (no token could pass)")
        return value

    @field_validator("forward")
    @classmethod
    def _check_forward(cls, value: dict[str, str]) -> dict[str, str]:
        out = {claim: _header_name(header, f"forward.{claim}") for claim, header in value.items()}
        if _CONSUMER_SCOPES in out.values():
            raise ValueError(f"forward cannot write {_CONSUMER_SCOPES}: the plugin sets it from the token's scopes")
        if len(set(out.values())) != len(out):
            raise ValueError("forward names the same header for two claims")
        return out

    @model_validator(mode="after")
    def _check_keys(self) -> JwtOptions:
        sources = [
            name
            for name in ("secret", "secret_env", "public_key", "public_key_file", "jwks_url")
            if getattr(self, name) is not None
        ]
        if not sources:
            raise ValueError(
                "no key source: set exactly one of secret, secret_env, public_key, public_key_file, jwks_url"
            )
        if len(sources) > 1:
            raise ValueError(f"several key sources ({', '.join(sources)}): set exactly one")
        symmetric = sources[0] in ("secret", "secret_env")
        if symmetric and not set(self.algorithms) <= _HMAC_ALGORITHMS:
            raise ValueError(f"{sources[0]} is an HMAC secret: algorithms must be HS256, HS384 or HS512")
        if not symmetric and not set(self.algorithms) <= _ASYMMETRIC_ALGORITHMS:
            raise ValueError(
                f"{sources[0]} gives public keys: algorithms must be asymmetric (RS*, PS*, ES*, EdDSA), "
                "never HS* (that is the key-confusion attack)"
            )
        if self.jwks_url is not None:
            parts = urlsplit(self.jwks_url)
            loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"jwks_url {self.jwks_url!r} must be an http(s) URL")
            if parts.scheme == "http" and not loopback and not self.jwks_allow_http:
                raise ValueError(
                    "jwks_url uses plain http: anyone on the path could swap the keys; "
                    "use https, or set jwks_allow_http: true to accept the risk"
                )
        if not self.require_exp and "exp" in self.require and "require" in self.model_fields_set:
            raise ValueError("require lists exp but require_exp is false: choose one")
        if self.header in self.forward.values() or self.header in (_CONSUMER_ID, _CONSUMER_SCOPES):
            raise ValueError(f"header {self.header!r} is also an identity header the plugin sets")
        return self

    def required_claims(self) -> list[str]:
        """The claims a token must carry (``require`` with ``exp`` added or dropped by ``require_exp``)."""
        claims = [c for c in self.require if c != "exp"]
        return ["exp", *claims] if self.require_exp else claims


@dataclass(frozen=True, slots=True)
class _Key:
    """A verification key and the algorithms it may verify (the allow-list narrowed to the key's type)."""

    key: Any
    algorithms: list[str]
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: dict[str, _Key]
    keys: tuple[_Key, ...]

    def select(self, header: Mapping[str, Any]) -> _Key | None:
        kid = header.get("kid")
        if kid is None:
            # a token without kid is acceptable only when there is no choice to make
            return self.keys[0] if len(self.keys) == 1 else None
        return self.by_kid.get(kid) if isinstance(kid, str) else None


_EMPTY_KEYSET = _KeySet({}, ())


@dataclass(frozen=True, slots=True)
class _Verified:
    """What a successful verification decided, kept to answer the same token again."""

    consumer: str
    claims: dict[str, Any]
    forwarded: tuple[tuple[str, str], ...]
    deadline: float  # wall-clock seconds: exp + leeway (inf without exp)


def _deadline(claims: Mapping[str, Any], leeway: float) -> float:
    exp = claims.get("exp")
    return float(exp) + leeway if isinstance(exp, int | float) and not isinstance(exp, bool) else float("inf")


class _JwksError(Exception):
    """The JWKS endpoint did not give a usable key set (internal: logged, never raised to the gateway)."""


def _algorithms_for_key(key: object) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_ALGORITHMS_BY_CURVE.get(key.curve.name, frozenset())
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return _OKP_ALGORITHMS
    return frozenset()


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removesuffix("PublicKey")


def _load_public_pem(data: bytes, where: str) -> Any:
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"{where} is not a PEM public key or certificate",
            hint="give the issuer's public key (-----BEGIN PUBLIC KEY-----), never a private key",
        ) from exc


def _token_scopes(claims: Mapping[str, Any]) -> list[str]:
    """The scopes a token grants: ``scope`` (space-separated) and/or ``scp`` (list, or space-separated string)."""
    out: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            out.extend(value.split())
        elif isinstance(value, list):
            # an item with spaces inside is not one scope: ignore it rather than grant each word
            out.extend(v for v in value if isinstance(v, str) and v and not any(c.isspace() for c in v))
    return list(dict.fromkeys(out))


def _claim_key(value: object) -> tuple[str, object] | None:
    """A comparable form of a claim value that keeps ``True`` and ``1`` apart; ``None`` if not a scalar."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("str", value)
    return None


def _claim_matches(value: object, accepted: frozenset[tuple[str, object]]) -> bool:
    if isinstance(value, list):
        return any(_claim_key(v) in accepted for v in value)
    return _claim_key(value) in accepted


def _header_value(value: object) -> str | None:
    """A claim as a header value: printable ASCII as is, other text percent-encoded; ``None`` if it has controls."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    if _PRINTABLE_ASCII.fullmatch(text):
        return text
    if _CONTROL.search(text):
        return None
    return quote(text, safe=_PRINTABLE_SAFE)


def _unverified_header(token: str) -> dict[str, Any] | None:
    """The JOSE header of a token already checked against ``_COMPACT_JWS`` (``None``: not a JSON object).

    Only ``alg`` and ``kid`` are read from it, to pick the key; PyJWT parses the whole token again, strictly.
    """
    segment = token.partition(".")[0].rstrip("=")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _bad_time_claim(claims: Mapping[str, Any]) -> str | None:
    """The first of ``exp`` / ``nbf`` / ``iat`` that is present but not a JSON number (PyJWT takes ``"123"``)."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return name
    return None


def _reason(exc: jwt.PyJWTError) -> str:
    """A message for a failed verification that names the cause, never the token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token is not meant for this audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token's issuer is not accepted"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the token's algorithm is not accepted for its key"
    if isinstance(exc, jwt.InvalidKeyError):
        return "the token's key cannot be used"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "the token's iat claim is not a number"
    if isinstance(exc, InvalidSubjectError):
        return "the token's sub claim is not a string"
    if isinstance(exc, InvalidJTIError):
        return "the token's jti claim is not a string"
    if isinstance(exc, jwt.DecodeError):
        return "the token is malformed"
    return "the token is invalid"


class JwtAuth(Plugin):
    """Verify ``Authorization: Bearer <JWT>`` and forward the caller's identity (see :class:`JwtOptions`).

    On success ``req.consumer`` is the ``consumer_claim`` (``sub``), ``req.claims`` the verified claims, and the
    ``forward`` headers are set. Failures answer 401 (``WWW-Authenticate: Bearer error="invalid_token"``; without
    ``error`` when no token was sent) or 403 (``error="insufficient_scope"``) for missing scopes or claim values.
    """

    name: ClassVar[str] = "jwt"
    Options: ClassVar[type[BaseModel]] = JwtOptions

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if isinstance(options, JwtOptions) else JwtOptions.model_validate(options or {})
        self._context = context if context is not None else PluginContext(clock=time.monotonic)
        self._clock = self._context.clock
        self._algorithms = frozenset(opts.algorithms)
        self._header = opts.header
        self._max_token = opts.max_token_bytes
        self._issuer = opts.issuer
        self._audience = opts.audience
        self._leeway = opts.leeway
        self._consumer_claim = opts.consumer_claim
        self._scopes = tuple(opts.scopes)
        self._claims = tuple(
            (claim, frozenset(filter(None, map(_claim_key, value if isinstance(value, list) else [value]))))
            for claim, value in opts.claims.items()
        )
        self._forward = tuple(opts.forward.items())
        self._strip = frozenset({*opts.forward.values(), _CONSUMER_ID, _CONSUMER_SCOPES})
        self._strip_authorization = opts.strip_authorization
        self._cache_size = opts.cache_size
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._wall = time.time  # exp is wall-clock time (PyJWT reads the same clock)
        decode_options: _DecodeOptions = {"require": opts.required_claims(), "enforce_minimum_key_length": True}
        self._decoder = jwt.PyJWT(options=decode_options)
        self._challenge = [("www-authenticate", f'Bearer realm="{opts.realm}"')]
        self._invalid_token = [("www-authenticate", 'Bearer error="invalid_token"')]
        self._insufficient = [("www-authenticate", 'Bearer error="insufficient_scope"')]

        # the key: one static key, or a JWKS fetched on demand
        self._key: _Key | None = None
        self._jwks_url = opts.jwks_url
        self._cache_seconds = opts.jwks_cache_seconds
        self._min_refresh = opts.jwks_min_refresh_seconds
        self._jwks_timeout = opts.jwks_timeout
        self._keyset = _EMPTY_KEYSET
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetch_failed = False
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        if opts.jwks_url is not None:
            self._context.on_close(self.aclose)
        else:
            self._key = self._static_key(opts)

    # ------------------------------------------------------------------------------------------------ keys

    def _static_key(self, opts: JwtOptions) -> _Key:
        algorithms = [a for a in opts.algorithms if a in self._algorithms]
        if opts.secret is not None or opts.secret_env is not None:
            if opts.secret is not None:
                secret = opts.secret.get_secret_value().encode()
                where = "secret"
            else:
                assert opts.secret_env is not None
                value = os.environ.get(opts.secret_env)
                if not value:
                    raise ConfigurationError(
                        f"the environment variable {opts.secret_env!r} named by secret_env is not set or empty"
                    )
                secret = value.encode()
                where = f"the secret in ${opts.secret_env}"
            for alg in algorithms:
                if len(secret) < _HMAC_MIN_BYTES[alg]:
                    raise ConfigurationError(
                        f"{where} is {len(secret)} bytes; {alg} needs at least {_HMAC_MIN_BYTES[alg]} (RFC 7518 3.2)",
                        hint="generate one with: python -c 'import secrets; print(secrets.token_urlsafe(64))'",
                    )
                try:
                    jwt.get_algorithm_by_name(alg).prepare_key(secret)
                except jwt.PyJWTError as exc:
                    raise ConfigurationError(f"{where} cannot be an HMAC secret: {exc}") from exc
            return _Key(secret, algorithms)
        if opts.public_key is not None:
            key = _load_public_pem(opts.public_key.encode(), "public_key")
            where = "public_key"
        else:
            assert opts.public_key_file is not None
            path = Path(opts.public_key_file)
            if not path.is_absolute():
                path = Path(self._context.folder) / path
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"public_key_file {str(path)!r} cannot be read: {exc.strerror}") from exc
            where = f"public_key_file {str(path)!r}"
            key = _load_public_pem(data, where)
        usable = [a for a in algorithms if a in _algorithms_for_key(key)]
        if not usable:
            raise ConfigurationError(
                f"{where} is an {_key_kind(key)} key, but algorithms allows only {', '.join(algorithms)}"
            )
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _RSA_MIN_BITS:
            raise ConfigurationError(f"{where} is an RSA key of {key.key_size} bits; at least {_RSA_MIN_BITS} needed")
        return _Key(key, usable)

    def _parse_jwks(self, document: Any) -> _KeySet:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _JwksError("the JWKS document is not an object with a 'keys' list")
        by_kid: dict[str, _Key] = {}
        keys: list[_Key] = []
        for index, jwk in enumerate(document["keys"]):
            parsed = self._parse_jwk(index, jwk)
            if parsed is None:
                continue
            if parsed.kid is not None:
                if parsed.kid in by_kid:
                    logger.warning("the JWKS has two keys with one kid; using the first", extra={"kid": parsed.kid})
                    continue
                by_kid[parsed.kid] = parsed
            keys.append(parsed)
        if not keys:
            logger.warning(
                "the JWKS has no key usable with the allowed algorithms",
                extra={"url": self._jwks_url, "algorithms": sorted(self._algorithms)},
            )
        return _KeySet(by_kid, tuple(keys))

    def _parse_jwk(self, index: int, jwk: Any) -> _Key | None:
        if not isinstance(jwk, dict):
            return None
        kty, use, alg, kid = jwk.get("kty"), jwk.get("use"), jwk.get("alg"), jwk.get("kid")
        if use is not None and use != "sig":
            return None
        if kty not in ("RSA", "EC", "OKP"):  # symmetric ("oct") and unknown key types never verify anything here
            return None
        try:
            key: Any
            if kty == "RSA":
                key = RSAAlgorithm.from_jwk(jwk)
            elif kty == "EC":
                key = ECAlgorithm.from_jwk(jwk)
            else:
                key = OKPAlgorithm.from_jwk(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            logger.warning("skipping a JWKS key that does not parse", extra={"index": index, "error": str(exc)})
            return None
        if not hasattr(key, "verify") and hasattr(key, "public_key"):
            logger.warning("the JWKS publishes a private key; using its public half", extra={"index": index})
            key = key.public_key()
        usable = self._algorithms & _algorithms_for_key(key)
        if alg is not None:
            usable = usable & {alg} if isinstance(alg, str) else frozenset()
        if not usable:
            return None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _RSA_MIN_BITS:
            logger.warning("skipping a JWKS RSA key under 2048 bits", extra={"index": index, "bits": key.key_size})
            return None
        return _Key(key, sorted(usable), kid if isinstance(kid, str) else None)

    def _may_fetch(self, now: float) -> bool:
        return not self._closed and (self._attempted_at is None or now - self._attempted_at >= self._min_refresh)

    async def _refresh(self) -> None:
        """Join the fetch in flight, or start one if the refetch budget allows; never raises."""
        task = self._inflight
        if task is None:
            now = self._clock()
            if not self._may_fetch(now):
                return  # a fetch finished meanwhile (or the budget is spent): use what we have
            self._attempted_at = now
            task = self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name="meshkit-jwks-fetch")
        # shield: a client that goes away must not cancel the fetch other requests wait for
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        try:
            keyset = self._parse_jwks(await self._download())
        except Exception as exc:  # any failure: keep serving the cached keys
            self._fetch_failed = True
            logger.warning(
                "the JWKS fetch failed; serving the cached keys",
                extra={
                    "url": self._jwks_url,
                    "error": str(exc) or type(exc).__name__,
                    "cached": len(self._keyset.keys),
                },
            )
        else:
            self._keyset = keyset
            self._verified.clear()  # tokens verified with keys that may be gone: verify them again
            self._fetched_at = self._clock()
            self._fetch_failed = False
            logger.debug("fetched the JWKS", extra={"url": self._jwks_url, "keys": len(keyset.keys)})
        finally:
            self._inflight = None

    async def _download(self) -> Any:
        import aiohttp  # noqa: PLC0415 - only plugins with a jwks_url need the HTTP client

        assert self._jwks_url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._jwks_timeout))
        async with self._session.get(self._jwks_url, headers={"accept": "application/json"}) as resp:
            if resp.status != 200:
                raise _JwksError(f"the JWKS endpoint answered {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise _JwksError(f"the JWKS document is over {_MAX_JWKS_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _JwksError("the JWKS document is not JSON") from exc

    async def aclose(self) -> None:
        """Stop any JWKS fetch and close the HTTP session (registered with ``PluginContext.on_close``)."""
        self._closed = True
        task = self._inflight
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # --------------------------------------------------------------------------------------------- requests

    def request(self, req: ProxyRequest) -> RequestResult:
        headers = req.headers
        name = self._header
        value, count = _credential(headers, name, self._strip)
        if value is None:
            return self._reject(req, 401, "a bearer token is required", self._challenge)
        if count > 1:
            return self._reject(req, 401, f"send one {name} header, not {count}", self._invalid_token)
        scheme, _, rest = value.partition(" ")
        if scheme.lower() != "bearer":
            return self._reject(req, 401, f"the {name} header must use the Bearer scheme", self._challenge)
        if len(rest) > self._max_token + 64:
            return self._too_large(req)
        token = rest.strip(" ")
        if not token:
            return self._invalid(req, "the Bearer token is empty")
        if len(token) > self._max_token:
            return self._too_large(req)
        if self._verified:
            verified = self._cached(token)
            if verified is not None:
                self._apply(req, verified)
                return None
        if not _COMPACT_JWS.fullmatch(token):
            return self._invalid(req, "the token is not a compact JWT (three base64url parts)")
        header = _unverified_header(token)
        if header is None:
            return self._invalid(req, "the token's header is malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            return self._invalid(req, "the token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return self._invalid(req, "the token's key id (kid) is not a string")
        if self._key is not None:
            return self._verify(req, token, self._key)

        # JWKS: synchronous while the key is cached; fetch (once, shared) when needed
        now = self._clock()
        key = self._keyset.select(header)
        if key is not None and self._fetched_at is not None and now - self._fetched_at < self._cache_seconds:
            return self._verify(req, token, key)
        if self._inflight is not None or self._may_fetch(now):
            return self._verify_after_fetch(req, token, header)
        if key is not None:  # the cache expired, but the endpoint failed recently: keep serving what we have
            return self._verify(req, token, key)
        return self._unknown_key(req, header)

    async def _verify_after_fetch(self, req: ProxyRequest, token: str, header: dict[str, Any]) -> Reply | None:
        await self._refresh()
        key = self._keyset.select(header)
        if key is None:
            return self._unknown_key(req, header)
        return self._verify(req, token, key)

    def _verify(self, req: ProxyRequest, token: str, key: _Key) -> Reply | None:
        try:
            claims: dict[str, Any] = self._decoder.decode(
                token,
                key.key,
                algorithms=key.algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as exc:
            return self._invalid(req, _reason(exc))
        except Exception as exc:  # e.g. a huge number where a time should be: still a 401
            return self._unexpected(req, exc)
        return self._accept(req, token, claims)

    def _accept(self, req: ProxyRequest, token: str, claims: dict[str, Any]) -> Reply | None:
        bad_time = _bad_time_claim(claims)
        if bad_time is not None:
            return self._invalid(req, f"the token's {bad_time} claim is not a number")
        consumer = claims.get(self._consumer_claim)
        if not isinstance(consumer, str) or not consumer:
            return self._invalid(req, f"the token has no {self._consumer_claim!r} claim naming the caller")
        forwarded: list[tuple[str, str]] = []
        for claim, header_name in self._forward:
            value = claims.get(claim, _MISSING)
            if value is _MISSING or value is None:
                continue
            text = _header_value(value)
            if text is None:
                return self._invalid(req, f"the token's {claim!r} claim has characters a header cannot carry")
            forwarded.append((header_name, text))
        granted = _token_scopes(claims)
        if granted:
            forwarded.append((_CONSUMER_SCOPES, quote(" ".join(granted), safe=_PRINTABLE_SAFE + " ")))
        if self._scopes:
            missing = [scope for scope in self._scopes if scope not in granted]
            if missing:
                return self._reject(req, 403, f"the token lacks the scope(s): {' '.join(missing)}", self._insufficient)
        for claim, accepted in self._claims:
            if not _claim_matches(claims.get(claim), accepted):
                return self._reject(req, 403, f"the token's {claim!r} claim is not accepted here", self._insufficient)
        verified = _Verified(consumer, claims, tuple(forwarded), _deadline(claims, self._leeway))
        if self._cache_size:
            cache = self._verified
            cache[token] = verified
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        self._apply(req, verified)
        return None

    def _apply(self, req: ProxyRequest, verified: _Verified) -> None:
        headers = req.headers
        for header_name, text in verified.forwarded:
            headers.add(header_name, text)
        if self._strip_authorization:
            headers.remove(self._header)
        req.consumer = verified.consumer
        req.claims = dict(verified.claims)  # a copy: a plugin changing it cannot change the cached entry

    def _cached(self, token: str) -> _Verified | None:
        """A still valid earlier verification of exactly this token (with keys that are still current)."""
        verified = self._verified.get(token)
        if verified is None:
            return None
        if verified.deadline <= self._wall() or (
            self._key is None and (self._fetched_at is None or self._clock() - self._fetched_at >= self._cache_seconds)
        ):
            del self._verified[token]
            return None
        self._verified.move_to_end(token)
        return verified

    # ------------------------------------------------------------------------------------------------- replies

    def _reject(self, req: ProxyRequest, status: int, message: str, challenge: list[tuple[str, str]]) -> Reply:
        logger.debug(
            "jwt auth refused a request",
            extra={"route": req.route, "client": req.client, "status": status, "reason": message},
        )
        return Reply.error(status, message, challenge)

    def _invalid(self, req: ProxyRequest, message: str) -> Reply:
        return self._reject(req, 401, message, self._invalid_token)

    def _too_large(self, req: ProxyRequest) -> Reply:
        return self._invalid(req, f"the token is larger than {self._max_token} bytes")

    def _unexpected(self, req: ProxyRequest, exc: Exception) -> Reply:
        logger.warning(
            "a token could not be verified (unexpected error; answered 401)",
            extra={"route": req.route, "client": req.client, "error": type(exc).__name__},
        )
        return self._invalid(req, "the token could not be verified")

    def _unknown_key(self, req: ProxyRequest, header: Mapping[str, Any]) -> Reply:
        if not self._keyset.keys:
            if self._fetch_failed:
                return self._invalid(req, "the signing keys are unavailable; try again later")
            return self._invalid(req, "no signing key is known")
        if header.get("kid") is None:
            return self._invalid(req, "the token has no key id (kid) and there are several keys")
        return self._invalid(req, "the token's key id (kid) is unknown")


# ----------------------------------------------------------------------------------------------------- API keys


def hash_api_key(key: str) -> str:
    """The at-rest form of an API key, ``sha256:<hex>``: what goes in the ``api_key`` plugin's ``keys``.

    The key is hashed as UTF-8; give keys of printable ASCII (as :func:`new_api_key` makes) so that what a client
    sends in a header is the same bytes.
    """
    if not key:
        raise ValueError("an API key cannot be empty")
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """A new random API key (256 bits, URL-safe); store only :func:`hash_api_key` of it."""
    return secrets.token_urlsafe(32)


class ApiKeyEntry(BaseModel):
    """One accepted key: ``name`` (becomes ``req.consumer`` and ``x-consumer-id``), ``hash`` (``sha256:<hex>``
    from :func:`hash_api_key`), ``scopes`` it grants. Several entries may share a name (a key being rotated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")
    hash: str
    scopes: list[str] = Field(default_factory=list)

    @field_validator("hash")
    @classmethod
    def _check_hash(cls, value: str) -> str:
        value = value.strip()
        if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", value):
            raise ValueError(
                "hash must be 'sha256:' and 64 hex digits (from meshkit.gateway.auth.hash_api_key); "
                "never put the plain key in the config"
            )
        return value.lower()

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: list[str]) -> list[str]:
        return _scope_list(value, "scopes")


class ApiKeyOptions(BaseModel):
    """Options of the ``api_key`` plugin.

    - ``keys``: the accepted keys (:class:`ApiKeyEntry`), hashed.
    - ``header`` (``x-api-key``): where the key is sent; ``query`` (none): also accept it in this query parameter
      (keys in URLs end up in logs: prefer the header).
    - ``scopes``: scopes the route requires; a key lacking one gets 403.
    - ``strip_key`` (true): remove the key (header and query parameter) before forwarding upstream.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[ApiKeyEntry] = Field(min_length=1)
    header: str = "x-api-key"
    query: str | None = Field(None, min_length=1)
    scopes: list[str] = Field(default_factory=list)
    strip_key: bool = True

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        name = _header_name(value, "header")
        if name in (_CONSUMER_ID, _CONSUMER_SCOPES):
            raise ValueError(f"header {name!r} is an identity header the plugin sets")
        return name

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: list[str]) -> list[str]:
        return _scope_list(value, "scopes")

    @field_validator("keys")
    @classmethod
    def _check_unique(cls, value: list[ApiKeyEntry]) -> list[ApiKeyEntry]:
        seen: dict[str, str] = {}
        for entry in value:
            if entry.hash in seen:
                raise ValueError(f"keys {seen[entry.hash]!r} and {entry.name!r} have the same hash (the same key)")
            seen[entry.hash] = entry.name
        return value


@dataclass(frozen=True, slots=True)
class _ApiKey:
    name: str
    digest: bytes
    scopes: frozenset[str]
    scopes_header: str


def _query_param(query: str, name: str) -> str | None:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if unquote_plus(key) == name:
            return unquote_plus(value)
    return None


def _without_param(query: str, name: str) -> str:
    return "&".join(part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != name)


class ApiKeyAuth(Plugin):
    """Accept requests that carry a known API key (see :class:`ApiKeyOptions`).

    On success ``req.consumer`` is the key's name, and ``x-consumer-id`` (plus ``x-consumer-scopes`` when the key
    has scopes) is set for the upstream. Missing or unknown keys answer 401; a key lacking a required scope 403.
    """

    name: ClassVar[str] = "api_key"
    Options: ClassVar[type[BaseModel]] = ApiKeyOptions

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if isinstance(options, ApiKeyOptions) else ApiKeyOptions.model_validate(options or {})
        self._header = opts.header
        self._query = opts.query
        self._scopes = tuple(opts.scopes)
        self._strip_key = opts.strip_key
        self._table: dict[bytes, _ApiKey] = {}
        for entry in opts.keys:
            digest = bytes.fromhex(entry.hash.removeprefix("sha256:"))
            self._table[digest] = _ApiKey(entry.name, digest, frozenset(entry.scopes), " ".join(entry.scopes))

    def request(self, req: ProxyRequest) -> RequestResult:
        headers = req.headers
        name = self._header
        value, count = _credential(headers, name, _IDENTITY)
        presented: bytes | None = None
        if value is not None:
            # header values are ISO-8859-1 decoded: encoding back gives the bytes the client sent
            presented = value.strip(" \t").encode("latin-1")
        elif self._query is not None and req.query:
            param = _query_param(req.query, self._query)
            if param is not None:
                presented = param.encode("utf-8", "surrogateescape")
        if self._strip_key:
            if count:
                headers.remove(name)
            if self._query is not None and req.query:
                req.query = _without_param(req.query, self._query)
        if not presented:
            return _api_reject(req, 401, "an API key is required")
        if count > 1:
            return _api_reject(req, 401, f"send one {name} header, not {count}")
        digest = hashlib.sha256(presented).digest()
        entry = self._table.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return _api_reject(req, 401, "the API key is not valid")
        if self._scopes:
            missing = [scope for scope in self._scopes if scope not in entry.scopes]
            if missing:
                return _api_reject(req, 403, f"the API key lacks the scope(s): {' '.join(missing)}")
        headers.add(_CONSUMER_ID, entry.name)
        if entry.scopes_header:
            headers.add(_CONSUMER_SCOPES, entry.scopes_header)
        req.consumer = entry.name
        return None


def _api_reject(req: ProxyRequest, status: int, message: str) -> Reply:
    logger.debug(
        "api_key auth refused a request",
        extra={"route": req.route, "client": req.client, "status": status, "reason": message},
    )
    return Reply.error(status, message)
