"""A reusable corpus of hostile JSON Web Tokens, and the keys and JWKS server to test a verifier with.

Used by the ``jwt`` plugin's unit tests and by the gateway's end-to-end tests. The contract:

- :func:`make_keys` makes fresh keys (:class:`Keys`); :func:`jwks_document` is the key set the verifier's JWKS
  endpoint serves (by default the two legitimate RSA keys, ``rsa-1`` and ``rsa-2``, so that a token without a
  ``kid`` is ambiguous); :class:`JwksServer` serves it on a free loopback port and counts the fetches.
- :func:`corpus_options` are the ``jwt`` plugin options the corpus is written against: ``algorithms: [RS256]``, that
  JWKS, :data:`ISSUER`, :data:`AUDIENCE`, and the defaults for everything else (``leeway`` 30 s,
  ``max_token_bytes`` 8192).
- :func:`good_token` makes a token such a verifier accepts (the control: a corpus that fails only because the
  verifier is misconfigured proves nothing).
- :func:`attack_tokens` returns ``(description, authorization)`` pairs, where ``authorization`` is the whole value
  of the ``Authorization`` header (most are ``"Bearer <token>"``; some have another scheme or no token at all).
  Every one must be answered 401, with no identity set. Tokens are made relative to the current time, so build
  the corpus right before using it. A few values cannot travel over HTTP/1.1 as they are (CR, LF or NUL inside):
  :func:`sendable` tells which, for tests that go through a real socket.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.local_http import LocalServer

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "KID_ATTACKER",
    "KID_EC",
    "KID_ED",
    "KID_RSA",
    "KID_RSA_NEXT",
    "JwksServer",
    "Keys",
    "attack_tokens",
    "b64url",
    "compact",
    "corpus_options",
    "good_claims",
    "good_token",
    "jwks_document",
    "make_keys",
    "public_jwk",
    "public_pem",
    "sendable",
    "signer",
]

ISSUER = "https://issuer.meshkit.test/"
AUDIENCE = "meshkit-gateway-tests"
KID_RSA = "rsa-1"
KID_RSA_NEXT = "rsa-2"
KID_EC = "ec-1"
KID_ED = "ed-1"
KID_ATTACKER = "evil-1"

Signer = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Keys:
    """The private keys a test signs with. ``rsa`` and ``rsa_next`` are legitimate (a key rotation);
    ``attacker`` is an RSA key the verifier never trusts."""

    rsa: RSAPrivateKey
    rsa_next: RSAPrivateKey
    ec: EllipticCurvePrivateKey
    ed: Ed25519PrivateKey
    hmac_secret: bytes
    attacker: RSAPrivateKey


def make_keys() -> Keys:
    """Fresh keys: three RSA-2048 pairs, an EC P-256 pair, an Ed25519 pair and a 64-byte HMAC secret."""
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_next=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
        hmac_secret=b"meshkit-test-hmac-secret-" + bytes(range(65, 65 + 39)),
        attacker=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


PrivateKey = RSAPrivateKey | EllipticCurvePrivateKey | Ed25519PrivateKey


def public_pem(key: PrivateKey) -> str:
    """The PEM (SubjectPublicKeyInfo) of ``key``'s public half."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def public_jwk(key: PrivateKey, kid: str | None, *, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of ``key`` (with ``use: sig``, and ``kid`` / ``alg`` when given)."""
    public = key.public_key()
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk["use"] = "sig"
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def jwks_document(keys: Keys, *names: str) -> dict[str, Any]:
    """A JWKS of the named keys (``rsa``, ``rsa_next``, ``ec``, ``ed``, ``attacker``); default ``rsa, rsa_next``."""
    kids = {"rsa": KID_RSA, "rsa_next": KID_RSA_NEXT, "ec": KID_EC, "ed": KID_ED, "attacker": KID_ATTACKER}
    return {"keys": [public_jwk(getattr(keys, name), kids[name]) for name in names or ("rsa", "rsa_next")]}


def corpus_options(jwks_url: str, **overrides: Any) -> dict[str, Any]:
    """The ``jwt`` plugin options the attack corpus is written against (see the module docstring)."""
    return {"algorithms": ["RS256"], "jwks_url": jwks_url, "issuer": ISSUER, "audience": AUDIENCE, **overrides}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    return json.dumps(part, separators=(",", ":")).encode()


def compact(header: Any, payload: Any, sign: Signer | None = None, *, signature: bytes | None = None) -> str:
    """A compact JWS from any header / payload (objects are JSON-encoded; ``bytes`` / ``str`` used as they are).

    ``sign`` signs the signing input; ``signature`` gives the signature bytes directly; neither: empty signature.
    """
    signing_input = f"{b64url(_segment(header))}.{b64url(_segment(payload))}"
    if sign is not None:
        signature = sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature or b'')}"


def signer(key: Any, alg: str) -> Signer:
    """A function signing bytes with ``key`` (a private key, or HMAC secret bytes) under ``alg``."""
    algorithm = jwt.get_algorithm_by_name(alg)
    if alg.startswith("HS"):
        # bypass PyJWT's refusal of PEM-looking HMAC secrets: forging such tokens is the point of the corpus
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        return lambda data: hmac.new(key, data, digest).digest()
    return lambda data: algorithm.sign(data, key)


def good_claims(
    *, issuer: str = ISSUER, audience: str = AUDIENCE, lifetime: float = 300, **extra: Any
) -> dict[str, Any]:
    """Claims a verifier configured with ``issuer`` / ``audience`` accepts: ``sub`` alice, ``iat`` now, ``exp``."""
    now = int(time.time())
    return {"sub": "alice", "iss": issuer, "aud": audience, "iat": now, "exp": now + int(lifetime), **extra}


def _family(keys: Keys, alg: str) -> tuple[Any, str]:
    if alg.startswith("HS"):
        return keys.hmac_secret, "hmac-1"
    if alg.startswith(("RS", "PS")):
        return keys.rsa, KID_RSA
    if alg.startswith("ES"):
        return keys.ec, KID_EC
    if alg == "EdDSA":
        return keys.ed, KID_ED
    raise ValueError(f"no test key for {alg}")


def good_token(
    keys: Keys,
    alg: str = "RS256",
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    claims: dict[str, Any] | None = None,
    kid: str | None = "",
    key: Any = None,
    lifetime: float = 300,
) -> str:
    """A valid token signed under ``alg`` with the matching test key (``kid`` ``""``: that key's kid; ``None``: no
    kid). ``claims`` are added to (or replace) :func:`good_claims`; ``key`` signs with another key."""
    default_key, default_kid = _family(keys, alg)
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid or default_kid
    payload = good_claims(issuer=issuer, audience=audience, lifetime=lifetime)
    payload.update(claims or {})
    return compact(header, payload, signer(key if key is not None else default_key, alg))


def sendable(authorization: str) -> bool:
    """Whether a header value can be sent over HTTP/1.1 as it is (ISO-8859-1, no CR, LF or NUL)."""
    try:
        authorization.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(c in authorization for c in "\r\n\x00")


def attack_tokens(
    keys: Keys, *, issuer: str = ISSUER, audience: str = AUDIENCE, max_token_bytes: int = 8192
) -> list[tuple[str, str]]:
    """``(description, Authorization header value)`` pairs that a verifier set up with :func:`corpus_options`
    must all answer 401 (see the module docstring)."""
    now = int(time.time())
    base = {"sub": "mallory", "iss": issuer, "aud": audience, "iat": now, "exp": now + 300}
    head = {"alg": "RS256", "typ": "JWT", "kid": KID_RSA}
    rs256 = signer(keys.rsa, "RS256")
    attacker = signer(keys.attacker, "RS256")
    pem = public_pem(keys.rsa).encode()
    der = keys.rsa.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwks_json = json.dumps(jwks_document(keys)).encode()
    jwk_json = json.dumps(public_jwk(keys.rsa, KID_RSA)).encode()
    attacker_jwk = public_jwk(keys.attacker, KID_ATTACKER)

    def rs(payload: Any = None, header: Any = None, sign: Signer | None = rs256) -> str:
        return compact(head if header is None else header, base if payload is None else payload, sign)

    def claims(**changes: Any) -> dict[str, Any]:
        out = {k: v for k, v in base.items() if k not in changes or changes[k] is not _DROP}
        out.update({k: v for k, v in changes.items() if v is not _DROP})
        return out

    def raw_payload(extra: str) -> bytes:
        # JSON text json.dumps cannot write (1e400, NaN): the claims without exp, then the raw member
        without_exp = json.dumps({k: v for k, v in base.items() if k != "exp"}, separators=(",", ":"))
        return f"{without_exp[:-1]},{extra}}}".encode()

    good = rs()
    h, p, s = good.split(".")
    out: list[tuple[str, str]] = []

    def add(description: str, token: str, *, scheme: str | None = "Bearer ") -> None:
        out.append((description, token if scheme is None else scheme + token))

    # --- alg: none and other non-algorithms
    for spelling in ("none", "None", "NONE", "nOnE"):
        add(f"alg {spelling}, empty signature", compact({**head, "alg": spelling}, base))
    none_header = {**head, "alg": "none"}
    add("alg none with an RS256 signature of the same input", compact(none_header, base, rs256))
    add("alg None with a junk signature", compact({**head, "alg": "None"}, base, signature=b"junk"))
    add("alg none without kid or typ", compact({"alg": "none"}, base))
    add("alg empty string", rs(header={**head, "alg": ""}))
    add("alg missing from the header", rs(header={"typ": "JWT", "kid": KID_RSA}))
    add("alg null", rs(header={**head, "alg": None}))
    add("alg a list ['RS256']", rs(header={**head, "alg": ["RS256"]}))
    add("alg 'RS256 ' with a trailing space", rs(header={**head, "alg": "RS256 "}))
    add("alg 'rs256' lower-case", rs(header={**head, "alg": "rs256"}))

    # --- key confusion: HMAC keyed with public material
    for alg in ("HS256", "HS384", "HS512"):
        add(f"{alg} signed with the RSA public key PEM", rs(header={**head, "alg": alg}, sign=signer(pem, alg)))
    add(
        "HS256 signed with the PEM without its final newline",
        rs(header={**head, "alg": "HS256"}, sign=signer(pem.rstrip(), "HS256")),
    )
    add("HS256 signed with the public key DER", rs(header={**head, "alg": "HS256"}, sign=signer(der, "HS256")))
    add("HS256 signed with the JWKS JSON", rs(header={**head, "alg": "HS256"}, sign=signer(jwks_json, "HS256")))
    add("HS256 signed with the JWK JSON", rs(header={**head, "alg": "HS256"}, sign=signer(jwk_json, "HS256")))
    modulus = public_jwk(keys.rsa, None)["n"].encode()
    add("HS256 signed with the JWK modulus", rs(header={**head, "alg": "HS256"}, sign=signer(modulus, "HS256")))
    add("HS256 signed with an empty secret", rs(header={**head, "alg": "HS256"}, sign=signer(b"", "HS256")))
    add(
        "HS256 signed with the real HMAC secret (HMAC not allowed)",
        rs(header={**head, "alg": "HS256"}, sign=signer(keys.hmac_secret, "HS256")),
    )

    # --- kid: selecting the key
    add("kid unknown", rs(header={**head, "kid": "no-such-key"}))
    add("kid missing while the JWKS has several keys", rs(header={"alg": "RS256", "typ": "JWT"}))
    add("kid path traversal to /dev/null", rs(header={**head, "kid": "../../../../../../dev/null"}))
    add("kid path traversal to /etc/passwd", rs(header={**head, "kid": "../../../etc/passwd"}))
    add("kid SQL injection", rs(header={**head, "kid": "' OR '1'='1"}))
    add("kid SQL union", rs(header={**head, "kid": "x' UNION SELECT 'secret' --"}))
    add("kid a number", rs(header={**head, "kid": 1}))
    add("kid a list", rs(header={**head, "kid": [KID_RSA]}))
    add("kid empty string", rs(header={**head, "kid": ""}))
    add("kid with a NUL byte", rs(header={**head, "kid": KID_RSA + "\x00"}))
    add("kid of the second real key, signed by the first", rs(header={**head, "kid": KID_RSA_NEXT}))
    add("kid of the EC key on an RS256 token", rs(header={**head, "kid": KID_EC}))

    # --- signatures
    add("signature made with the attacker's RSA key", rs(sign=attacker))
    add(
        "signature made with the attacker's RSA key and the attacker's kid",
        rs(header={**head, "kid": KID_ATTACKER}, sign=attacker),
    )
    tampered = b64url(_segment(claims(sub="admin")))
    add("tampered payload with the original signature", f"{h}.{tampered}.{s}")
    add(
        "tampered header (kid) with the original signature",
        f"{b64url(_segment({**head, 'kid': KID_RSA_NEXT}))}.{p}.{s}",
    )
    middle = len(s) // 2
    flipped = s[:middle] + ("A" if s[middle] != "A" else "B") + s[middle + 1 :]
    add("tampered signature (one character)", f"{h}.{p}.{flipped}")
    add("truncated signature", f"{h}.{p}.{s[: len(s) // 2]}")
    add("empty signature", f"{h}.{p}.")
    add("signature with an extra byte", f"{h}.{p}.{b64url(base64.urlsafe_b64decode(s + '==') + b'x')}")
    add("signature of another token", f"{h}.{p}.{rs(payload=claims(sub='someone-else')).split('.')[2]}")

    # --- algorithms outside the allow-list (RS256 only)
    add("RS384 signed with the real RSA key", rs(header={**head, "alg": "RS384"}, sign=signer(keys.rsa, "RS384")))
    add("RS512 signed with the real RSA key", rs(header={**head, "alg": "RS512"}, sign=signer(keys.rsa, "RS512")))
    add("PS256 signed with the real RSA key", rs(header={**head, "alg": "PS256"}, sign=signer(keys.rsa, "PS256")))
    add("ES256 signed with the EC key", rs(header={**head, "alg": "ES256"}, sign=signer(keys.ec, "ES256")))
    add("EdDSA signed with the Ed25519 key", rs(header={**head, "alg": "EdDSA"}, sign=signer(keys.ed, "EdDSA")))

    # --- headers that point at other keys (a verifier must ignore them)
    evil = "https://attacker.invalid/jwks.json"
    add("jku pointing at the attacker's JWKS", rs(header={**head, "kid": KID_ATTACKER, "jku": evil}, sign=attacker))
    add("jku pointing at the attacker's JWKS, real kid", rs(header={**head, "jku": evil}, sign=attacker))
    add(
        "x5u pointing at the attacker's certificate",
        rs(header={**head, "x5u": "https://attacker.invalid/cert.pem"}, sign=attacker),
    )
    add(
        "jwk header embedding the attacker's key",
        rs(header={**head, "kid": KID_ATTACKER, "jwk": attacker_jwk}, sign=attacker),
    )
    add(
        "jwk header embedding the attacker's key, real kid",
        rs(header={**head, "jwk": {**attacker_jwk, "kid": KID_RSA}}, sign=attacker),
    )
    add("crit with an unknown extension", rs(header={**head, "crit": ["exp-ext"], "exp-ext": True}))
    add("crit not a list", rs(header={**head, "crit": "b64"}))
    add("b64 false (detached payload) with a payload", rs(header={**head, "b64": False, "crit": ["b64"]}))
    add("zip DEF with a deflated payload", rs(header={**head, "zip": "DEF"}, payload=zlib.compress(_segment(base))))

    # --- time
    add("expired an hour ago", rs(payload=claims(exp=now - 3600)))
    add("expired 90 seconds ago (beyond a 30 s leeway)", rs(payload=claims(exp=now - 90)))
    add("nbf an hour in the future", rs(payload=claims(nbf=now + 3600)))
    add("iat an hour in the future", rs(payload=claims(iat=now + 3600)))
    add("exp missing", rs(payload=claims(exp=_DROP)))
    add("exp a string", rs(payload=claims(exp=str(now + 300))))
    add("exp null", rs(payload=claims(exp=None)))
    add("exp an object", rs(payload=claims(exp={"$gt": 0})))
    add("exp 1e400 (infinity)", rs(payload=raw_payload('"exp":1e400')))
    add("exp NaN", rs(payload=raw_payload('"exp":NaN')))
    add("nbf a string", rs(payload=claims(nbf="yesterday")))
    add("iat a string", rs(payload=claims(iat="now")))

    # --- issuer, audience, subject
    add("iss wrong", rs(payload=claims(iss="https://attacker.invalid/")))
    add("iss missing", rs(payload=claims(iss=_DROP)))
    add("iss a list holding the issuer", rs(payload=claims(iss=[issuer])))
    add("iss with a trailing space", rs(payload=claims(iss=issuer + " ")))
    add("aud wrong", rs(payload=claims(aud="another-api")))
    add("aud missing", rs(payload=claims(aud=_DROP)))
    add("aud a list without ours", rs(payload=claims(aud=["another-api", "a-third-api"])))
    add("aud a number", rs(payload=claims(aud=42)))
    add("sub missing", rs(payload=claims(sub=_DROP)))
    add("sub a number", rs(payload=claims(sub=42)))
    add("sub empty", rs(payload=claims(sub="")))
    add("sub with CR LF (header injection)", rs(payload=claims(sub="alice\r\nx-admin: true")))

    # --- size
    add("huge token (claims over max_token_bytes)", rs(payload=claims(pad="A" * max_token_bytes)))
    add("huge header (over max_token_bytes)", rs(header={**head, "pad": "A" * max_token_bytes}))

    # --- encoding and structure
    add("invalid base64 characters in the header", f"{h[:5]}!{h[6:]}.{p}.{s}")
    add("padding in the middle of a segment", f"{h[:8]}=={h[8:]}.{p}.{s}")
    add("too much padding", f"{h}===.{p}.{s}")
    add("standard base64 alphabet (+ and /)", f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}+/")
    add("header not JSON", rs(header=b"not json at all"))
    add("header a JSON array", rs(header=[head]))
    add("header JSON with trailing garbage", rs(header=_segment(head) + b"}}"))
    add("payload not JSON", rs(payload=b"this is not json"))
    add("payload a JSON array", rs(payload=[base]))
    add("payload a JSON string", rs(payload=json.dumps("sub=admin")))
    add("payload a JSON number", rs(payload=b"12345"))
    add("payload JSON null", rs(payload=b"null"))
    add("payload nested 2000 levels deep", rs(payload=raw_payload('"deep":' + "[" * 2000 + "]" * 2000)))
    add("payload invalid UTF-8", rs(payload=b'{"sub":"\xff\xfe"}'))
    add("two segments", f"{h}.{p}")
    add("one segment", h)
    add("four segments", f"{h}.{p}.{s}.{s}")
    add("five segments (JWE shape)", f"{h}.{p}.{s}.{s}.{s}")
    add("trailing dot", f"{good}.")
    add("only dots", "..")
    add("empty token", "")
    add("space inside the token", f"{h}.{p[:10]} {p[10:]}.{s}")
    add("newline inside the token", f"{h}.{p}\n.{s}")
    add("tab inside the token", f"{h}.\t{p}.{s}")
    add("NUL inside the token", f"{h}.{p}.{s}\x00")
    add("two tokens", f"{good} {good}")
    add("unicode garbage (ISO-8859-1)", "\xe9\xff\xfe.\xc3\xa9\xa0.\xbf\xbf")
    add("unicode garbage beyond ISO-8859-1", "\u2603.\u2603.\u2603")

    # --- scheme
    add("Bearer with no token", "Bearer", scheme=None)
    add("Basic credentials", "Basic dXNlcjpwYXNzd29yZA==", scheme=None)
    add("Token scheme", f"Token {good}", scheme=None)
    add("Bearer glued to the token", f"Bearer{good}", scheme=None)
    add("Bearer with a tab before the token", f"Bearer\t{good}", scheme=None)
    add("token without a scheme", good, scheme=None)
    return out


class _Drop:
    def __repr__(self) -> str:
        return "<drop>"


_DROP: Any = _Drop()


class JwksServer(LocalServer):
    """A real JWKS endpoint on a free loopback port (``url``), in the test's event loop.

    ``document`` is what it serves (change it to rotate keys); ``status`` other than 200 makes it fail;
    ``hold()`` makes requests wait until ``release()``; ``hits`` counts requests received.
    """

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.status = 200
        self.hits = 0
        self._gate: asyncio.Event | None = None
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        super().__init__(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        gate = self._gate
        if gate is not None:
            await gate.wait()
        if self.status != 200:
            return web.json_response({"error": "unavailable"}, status=self.status)
        return web.json_response(self.document)

    def stopping(self) -> None:
        self.release()
