"""Identity resolvers: who is calling, from a bearer JWT, a client certificate
or the headers of a trusted gateway.

Each resolver is an ``envelope_grpc.Resolver``: pass them, in order, as
``EnvelopeConfig(resolvers=[...])``. The first one that returns a principal
wins; one that raises ``Unauthenticated`` denies the call with
UNAUTHENTICATED and a machine reason code.

Everything a caller sends is untrusted: values are stripped of control
characters and bounded by the contract's limits (an identity that does not
fit is refused, never truncated), and no refusal message quotes a token, a
key, a secret or a raw header value, because the message reaches the caller,
the audit record and the span.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import re
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, TypeAlias

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509.oid import NameOID

from envelope_grpc._types import CallInfo, Peer, TrustPeer, Unauthenticated
from envelope_grpc._values import (
    AUTH_GATEWAY,
    AUTH_JWT,
    AUTH_MTLS,
    FLAG_GATEWAY_HEADERS_UNTRUSTED,
    PRINCIPAL_AGENT,
    PRINCIPAL_SERVICE,
    PRINCIPAL_USER,
)
from envelope_grpc.v1.envelope_pb2 import Principal, PrincipalKind

__all__ = [
    "ClaimMap",
    "ClaimPath",
    "GatewayResolver",
    "JwtKey",
    "JwtResolver",
    "MtlsResolver",
    "PrincipalMap",
    "trust_networks",
]


# Limits of the contract's Principal fields (envelope.proto).
_SUBJECT_MAX: Final = 256
_NAME_MAX: Final = 128  # tenant, project, each role
_ISSUER_MAX: Final = 512
_ROLES_MAX: Final = 64
_ON_BEHALF_OF_MAX: Final = 16

# C0/C1 controls, zero-width and bidi formatting characters, BOM: nothing an
# identity needs, and what log and terminal spoofing is made of.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_JWS_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SPIFFE_ID: Final = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")
_SPACES: Final = re.compile(r"\s+")
_COMMAS_OR_SPACES: Final = re.compile(r"[\s,]+")
_KIND_NAMES: Final = {"user": PRINCIPAL_USER, "service": PRINCIPAL_SERVICE, "agent": PRINCIPAL_AGENT}


class _Invalid(Exception):
    """A value that does not fit the contract; ``field`` names where it came
    from in configuration terms (a claim or header name), never its content."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def _text(value: object, field: str, limit: int, *, numbers: bool = False) -> str:
    """``value`` without control characters or surrounding blanks; "" when absent."""
    if value is None:
        return ""
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > 4 * limit:
        raise _Invalid(field)
    text = _CONTROL.sub("", value).strip()
    if len(text) > limit:
        raise _Invalid(field)
    return text


def _names(value: object, field: str, separator: re.Pattern[str], limit: int, item_max: int) -> list[str]:
    """A list of names from a list or a separated string, unique, in order."""
    if value is None:
        return []
    items: Sequence[object]
    if isinstance(value, str):
        if len(value) > 4 * limit * item_max:
            raise _Invalid(field)
        items = separator.split(value)
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise _Invalid(field)
    if len(items) > 4 * limit:
        raise _Invalid(field)
    names: list[str] = []
    for item in items:
        name = _text(item, field, item_max)
        if name and name not in names:
            names.append(name)
    if len(names) > limit:
        raise _Invalid(field)
    return names


def _kind(value: object) -> PrincipalKind.ValueType | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    return _KIND_NAMES.get(value.strip().lower().removeprefix("principal_kind_"))


# -- JWT ------------------------------------------------------------------------------------

#: A claim name, or a path of names into nested objects (("realm_access", "roles")).
ClaimPath: TypeAlias = str | tuple[str, ...]

#: A verification key: an HMAC secret (str or bytes), a PEM public key or
#: certificate (str or bytes), or a cryptography public key object.
JwtKey: TypeAlias = (
    str
    | bytes
    | rsa.RSAPublicKey
    | ec.EllipticCurvePublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimMap:
    """Which token claims become which principal fields.

    ``subject``, ``tenant``, ``project`` are strings (tenant and project may
    be integers); ``roles`` is a list or a space-separated string; ``kind`` is
    "user", "service" or "agent". Without a kind claim the kind is derived: a
    service for an OAuth client-credentials token (``gty`` is
    "client-credentials", or the subject equals ``client_id``/``azp``/``cid``),
    else ``default_kind``.

    Delegation: an RFC 8693 ``actor`` claim ({"sub": ..., "act": {...}})
    means the caller is the actor, acting for the token's subject. The
    principal's subject is then the current actor's, and ``on_behalf_of``
    lists the token's subject first, then the earlier actors in the order
    they acted. Without an actor claim, ``on_behalf_of`` (a list or a
    space-separated string) is taken as the chain the caller acts for.
    """

    subject: ClaimPath = "sub"
    tenant: ClaimPath = "tenant"
    project: ClaimPath = "project"
    roles: ClaimPath = "roles"
    kind: ClaimPath = "principal_kind"
    actor: ClaimPath = "act"
    on_behalf_of: ClaimPath = "obo"
    default_kind: PrincipalKind.ValueType = PRINCIPAL_USER


def _claim(claims: Mapping[str, object], path: ClaimPath) -> object:
    if isinstance(path, str):
        return claims.get(path)
    value: object = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _claim_name(path: ClaimPath) -> str:
    return path if isinstance(path, str) else ".".join(path)


def _claim_text(claims: Mapping[str, object], path: ClaimPath, limit: int, *, numbers: bool = False) -> str:
    """The claim at ``path`` as cleaned text; "" when absent."""
    return _text(_claim(claims, path), _claim_name(path), limit, numbers=numbers)


def _claim_names(claims: Mapping[str, object], path: ClaimPath, limit: int, item_max: int) -> list[str]:
    """The claim at ``path`` as a list of names (a list, or a space-separated string)."""
    return _names(_claim(claims, path), _claim_name(path), _SPACES, limit, item_max)


_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2
_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: Final[Mapping[str, type[ec.EllipticCurve]]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
    "ES256K": ec.SECP256K1,
}
_RSA_MIN_BITS: Final = 2048
_ALGORITHMS: Final = frozenset({*_HMAC_MIN_BYTES, *_RSA_ALGORITHMS, *_EC_CURVES, "EdDSA"})


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    """A verification key and the configured algorithms of its family: a
    token's ``alg`` is honoured only within these, so a public key can never
    be used as an HMAC secret (algorithm confusion)."""

    key: Any
    algorithms: tuple[str, ...]


def _prepare(key: JwtKey, algorithms: Sequence[str], name: str) -> _Key:
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, bytes):
        if not key.lstrip().startswith(b"-----BEGIN"):
            secret = tuple(alg for alg in algorithms if alg in _HMAC_MIN_BYTES)
            if not secret:
                raise ValueError(f"{name} is a shared secret but no HS algorithm is allowed")
            for alg in secret:
                if len(key) < _HMAC_MIN_BYTES[alg]:
                    raise ValueError(f"{name} is shorter than the {_HMAC_MIN_BYTES[alg]} bytes {alg} needs")
            return _Key(key, secret)
        try:
            if b"CERTIFICATE-----" in key:
                public: object = x509.load_pem_x509_certificate(key).public_key()
            else:
                public = load_pem_public_key(key)
        except ValueError:
            raise ValueError(f"{name} is not a PEM public key or certificate") from None
    else:
        public = key
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < _RSA_MIN_BITS:
            raise ValueError(f"{name} is an RSA key shorter than {_RSA_MIN_BITS} bits")
        fits = tuple(alg for alg in algorithms if alg in _RSA_ALGORITHMS)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        fits = tuple(
            alg for alg in algorithms if alg in _EC_CURVES and isinstance(public.curve, _EC_CURVES[alg])
        )
    elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        fits = tuple(alg for alg in algorithms if alg == "EdDSA")
    else:
        raise TypeError(f"{name} is not a supported public key ({type(public).__name__})")
    if not fits:
        raise ValueError(f"{name} fits none of the allowed algorithms {list(algorithms)}")
    return _Key(public, fits)


def _prepare_keys(keys: JwtKey | Mapping[str, JwtKey], algorithms: Sequence[str]) -> _Key | dict[str, _Key]:
    if isinstance(keys, Mapping):
        if not keys:
            raise ValueError("no verification key given")
        return {kid: _prepare(key, algorithms, f"key {kid!r}") for kid, key in keys.items()}
    return _prepare(keys, algorithms, "the key")


def _one_or_many(value: str | Sequence[str], what: str) -> str | list[str]:
    found = value if isinstance(value, str) else list(value)
    if not found or (isinstance(found, list) and not all(isinstance(v, str) and v for v in found)):
        raise ValueError(f"{what} must be a non-empty string or list of strings")
    return found


_TOKEN_MALFORMED: Final = "TOKEN_MALFORMED"
_TOKEN_INVALID_SIGNATURE: Final = "TOKEN_INVALID_SIGNATURE"

# PyJWT's exceptions, most specific first, to a reason code and a message of
# our own: PyJWT's texts may quote the token's contents.
_REFUSALS: Final[tuple[tuple[type[jwt.PyJWTError], str, str], ...]] = (
    (jwt.InvalidSignatureError, _TOKEN_INVALID_SIGNATURE, "the bearer token's signature does not verify"),
    (jwt.InvalidAlgorithmError, _TOKEN_INVALID_SIGNATURE, "the bearer token's algorithm is not accepted"),
    (jwt.InvalidKeyError, _TOKEN_INVALID_SIGNATURE, "the bearer token does not fit the verification key"),
    (jwt.ExpiredSignatureError, "TOKEN_EXPIRED", "the bearer token has expired"),
    (jwt.ImmatureSignatureError, "TOKEN_NOT_YET_VALID", "the bearer token is not valid yet"),
    (jwt.InvalidAudienceError, "TOKEN_WRONG_AUDIENCE", "the bearer token is not meant for this service"),
    (jwt.InvalidIssuerError, "TOKEN_WRONG_ISSUER", "the bearer token's issuer is not trusted"),
)
_MISSING_CLAIM: Final = {
    "aud": ("TOKEN_WRONG_AUDIENCE", "the bearer token names no audience"),
    "iss": ("TOKEN_WRONG_ISSUER", "the bearer token names no issuer"),
}


def _refusal(error: jwt.PyJWTError, required: Collection[str]) -> Unauthenticated:
    if isinstance(error, jwt.MissingRequiredClaimError):
        if error.claim in _MISSING_CLAIM:
            return Unauthenticated(*_MISSING_CLAIM[error.claim])
        if error.claim in required:  # a name from our configuration, not from the token
            return Unauthenticated(_TOKEN_MALFORMED, f"the bearer token lacks the {error.claim} claim")
    for kind, code, message in _REFUSALS:
        if isinstance(error, kind):
            return Unauthenticated(code, message)
    return Unauthenticated(_TOKEN_MALFORMED, "the bearer token is malformed")


class JwtResolver:
    """The caller named by a bearer JWT in the ``authorization`` metadata.

    The signature is verified with ``keys``: one key, or a mapping of key id
    (the token's ``kid``) to key for rotation. Only ``algorithms`` are
    accepted (never "none"), and each key only for the algorithms of its own
    family, whatever the token's header claims. ``issuer`` (one or several)
    and ``audience`` must match; ``required_claims`` must be present (by
    default ``exp`` and ``nbf``); times are checked with ``leeway`` seconds of
    clock skew. Claims become principal fields as ``claims`` says; the
    issuer becomes ``principal.issuer``.

    Without a bearer token the resolver passes (returns None) unless
    ``required``, then it refuses with CREDENTIAL_MISSING; more than one
    ``authorization`` header is refused with CREDENTIAL_AMBIGUOUS. A token
    that fails verification is refused with TOKEN_MALFORMED,
    TOKEN_INVALID_SIGNATURE, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID,
    TOKEN_WRONG_AUDIENCE or TOKEN_WRONG_ISSUER.
    """

    def __init__(
        self,
        *,
        keys: JwtKey | Mapping[str, JwtKey],
        algorithms: Sequence[str],
        issuer: str | Sequence[str],
        audience: str | Sequence[str],
        leeway: float | datetime.timedelta = 30.0,
        claims: ClaimMap | None = None,
        required: bool = False,
        required_claims: Sequence[str] = ("exp", "nbf"),
        max_token_length: int = 8192,
    ) -> None:
        if isinstance(algorithms, str) or not algorithms:
            raise ValueError("algorithms must be a non-empty list of algorithm names")
        unknown = [alg for alg in algorithms if alg not in _ALGORITHMS]
        if unknown:
            raise ValueError(f"algorithms not supported: {unknown} (supported: {sorted(_ALGORITHMS)})")
        self._algorithms = tuple(algorithms)
        self._keys = _prepare_keys(keys, self._algorithms)
        self._issuer = _one_or_many(issuer, "issuer")
        self._audience = _one_or_many(audience, "audience")
        self._leeway = leeway.total_seconds() if isinstance(leeway, datetime.timedelta) else float(leeway)
        self._claims = claims or ClaimMap()
        self.required = required
        self._required_claims = frozenset({"iss", "aud", *required_claims})
        self._max_token_length = max_token_length
        self._jwt = jwt.PyJWT(
            {
                "require": sorted(self._required_claims),
                "enforce_minimum_key_length": True,
                "verify_signature": True,
            }
        )

    def update_keys(self, keys: JwtKey | Mapping[str, JwtKey]) -> None:
        """Replace the verification keys (e.g. after fetching a new key set);
        calls in flight finish with the keys they started with."""
        self._keys = _prepare_keys(keys, self._algorithms)

    def __call__(self, call: CallInfo, /) -> Principal | None:
        """The token's principal; None without a bearer token (unless required)."""
        if "authorization" in call.repeated:
            raise Unauthenticated("CREDENTIAL_AMBIGUOUS", "more than one authorization header was sent")
        token = self._token(call.metadata.get("authorization"))
        if token is None:
            if self.required:
                raise Unauthenticated("CREDENTIAL_MISSING", "a bearer token is required")
            return None
        key = self._key_for(token)
        try:
            claims = self._jwt.decode(
                token,
                key.key,
                algorithms=key.algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as error:
            raise _refusal(error, self._required_claims) from None
        try:
            return self._principal(claims)
        except _Invalid as invalid:
            raise Unauthenticated(
                _TOKEN_MALFORMED, f"the bearer token's {invalid.field} claim is not usable"
            ) from None

    def _token(self, value: str | bytes | None) -> str | None:
        if not isinstance(value, str):
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None  # another scheme is another resolver's credential
        token = token.strip()
        if len(token) > self._max_token_length or not _JWS_COMPACT.fullmatch(token):
            raise Unauthenticated(_TOKEN_MALFORMED, "the bearer token is malformed")
        return token

    def _key_for(self, token: str) -> _Key:
        keys = self._keys
        if isinstance(keys, _Key):
            return keys
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Unauthenticated(_TOKEN_MALFORMED, "the bearer token is malformed") from None
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        found = keys.get(kid) if isinstance(kid, str) else None
        if found is None:
            raise Unauthenticated(
                _TOKEN_INVALID_SIGNATURE, "the bearer token names no key this service knows"
            )
        return found

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        names = self._claims
        caller, on_behalf_of = self._delegation(claims)
        subject = _claim_text(caller, names.subject, _SUBJECT_MAX)
        if not subject:
            raise _Invalid(_claim_name(names.subject))
        kind = _kind(_claim(caller, names.kind))
        if kind is None:
            kind = PRINCIPAL_SERVICE if _client_credentials(caller, subject) else names.default_kind
        return Principal(
            subject=subject,
            kind=kind,
            tenant=_claim_text(claims, names.tenant, _NAME_MAX, numbers=True),
            project=_claim_text(claims, names.project, _NAME_MAX, numbers=True),
            roles=_claim_names(claims, names.roles, _ROLES_MAX, _NAME_MAX),
            auth_method=AUTH_JWT,
            on_behalf_of=on_behalf_of,
            issuer=_text(claims.get("iss"), "iss", _ISSUER_MAX),
        )

    def _delegation(self, claims: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
        """The claims naming the caller, and the principals it acts for."""
        names = self._claims
        actor = _claim(claims, names.actor)
        if actor is None:
            return claims, _claim_names(claims, names.on_behalf_of, _ON_BEHALF_OF_MAX, _SUBJECT_MAX)
        field = _claim_name(names.actor)
        nested = names.actor if isinstance(names.actor, str) else names.actor[-1]
        actors: list[Mapping[str, Any]] = []  # the current actor first, the earliest last
        while actor is not None:
            if not isinstance(actor, Mapping) or len(actors) >= _ON_BEHALF_OF_MAX:
                raise _Invalid(field)
            actors.append(actor)
            actor = actor.get(nested)
        chain = []
        for party in (claims, *reversed(actors[1:])):
            name = _claim_text(party, names.subject, _SUBJECT_MAX)
            if not name:
                raise _Invalid(field)
            chain.append(name)
        return actors[0], chain


def _client_credentials(claims: Mapping[str, Any], subject: str) -> bool:
    if claims.get("gty") == "client-credentials":
        return True
    return any(claims.get(name) == subject for name in ("client_id", "azp", "cid"))


# -- mTLS -----------------------------------------------------------------------------------

#: How a principal field is found from the caller's identity: a callable of
#: the subject (SPIFFE ID or common name), or for SPIFFE IDs the name of a
#: path segment whose successor is the value ("ns" takes "acme" from
#: spiffe://example.org/ns/acme/sa/inference).
PrincipalMap: TypeAlias = str | Callable[[str], str | None]


@dataclasses.dataclass(frozen=True, slots=True)
class _PeerCertificate:
    spiffe_id: str
    trust_domain: str
    path: tuple[str, ...]
    common_name: str
    issuer: str
    not_after: float


def _common_name(name: x509.Name) -> str:
    for attribute in name.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


@functools.lru_cache(maxsize=256)
def _peer_certificate(pem: bytes) -> _PeerCertificate:
    """The identity facts of a client certificate (cached: a connection
    presents the same certificate on every call)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise _Invalid("certificate") from None
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        uris = []
    spiffe = [uri for uri in uris if uri.lower().startswith("spiffe://")]
    if len(spiffe) > 1:  # an X.509-SVID carries exactly one SPIFFE ID
        raise _Invalid("SPIFFE ID")
    spiffe_id, domain, path = "", "", ()
    if spiffe:
        match = _SPIFFE_ID.fullmatch(spiffe[0])
        segments = match.group(2).split("/")[1:] if match else []
        if not match or len(spiffe[0]) > _SUBJECT_MAX or any(s in (".", "..") for s in segments):
            raise _Invalid("SPIFFE ID")
        spiffe_id, domain, path = spiffe[0], match.group(1), tuple(segments)
    issuer = _common_name(certificate.issuer) or certificate.issuer.rfc4514_string()
    return _PeerCertificate(
        spiffe_id=spiffe_id,
        trust_domain=domain,
        path=path,
        common_name=_text(_common_name(certificate.subject), "subject", _SUBJECT_MAX),
        issuer=_text(issuer, "issuer", _ISSUER_MAX),
        not_after=certificate.not_valid_after_utc.timestamp(),
    )


class MtlsResolver:
    """The caller named by its verified TLS client certificate.

    The subject is the certificate's SPIFFE ID (its URI SAN), else its
    common name; with ``trust_domains`` only SPIFFE IDs of those trust
    domains are accepted. The kind is SERVICE, the issuer the CA's common
    name (or its full name when it has none). ``tenant`` and ``project`` map
    the identity to those fields (see PrincipalMap).

    The server's credentials must verify client certificates
    (``grpc.ssl_server_credentials(..., require_client_auth=True)``): the
    resolver trusts the certificate the transport reports. The certificate's
    expiry is checked again on every call, since a connection can outlive
    its certificate. Without a client certificate the resolver passes
    (returns None) unless ``required``, then it refuses with
    CREDENTIAL_MISSING.
    """

    def __init__(
        self,
        *,
        required: bool = False,
        tenant: PrincipalMap | None = None,
        project: PrincipalMap | None = None,
        trust_domains: Collection[str] | None = None,
    ) -> None:
        self.required = required
        self._tenant = tenant
        self._project = project
        self._trust_domains = frozenset(trust_domains) if trust_domains is not None else None

    def __call__(self, call: CallInfo, /) -> Principal | None:
        """The certificate's principal; None without a client certificate (unless required)."""
        context = call.peer.auth_context
        pems = context.get("x509_pem_cert")
        if b"ssl" not in context.get("transport_security_type", ()) or not pems:
            if self.required:
                raise Unauthenticated("CREDENTIAL_MISSING", "a client certificate is required")
            return None
        try:
            certificate = _peer_certificate(bytes(pems[0]))
        except _Invalid as invalid:
            raise Unauthenticated(
                "CERTIFICATE_INVALID", f"the client certificate's {invalid.field} is not usable"
            ) from None
        if certificate.not_after < time.time():
            raise Unauthenticated("CERTIFICATE_EXPIRED", "the client certificate has expired")
        if self._trust_domains is not None and certificate.trust_domain not in self._trust_domains:
            raise Unauthenticated(
                "CERTIFICATE_UNTRUSTED_DOMAIN",
                "the client certificate is not of a trusted SPIFFE trust domain",
            )
        subject = certificate.spiffe_id or certificate.common_name
        if not subject:
            raise Unauthenticated("CERTIFICATE_INVALID", "the client certificate names no identity")
        try:
            tenant = self._map(self._tenant, "tenant", certificate, subject)
            project = self._map(self._project, "project", certificate, subject)
        except _Invalid as invalid:
            raise Unauthenticated(
                "CERTIFICATE_INVALID", f"the client certificate maps to no usable {invalid.field}"
            ) from None
        return Principal(
            subject=subject,
            kind=PRINCIPAL_SERVICE,
            tenant=tenant,
            project=project,
            auth_method=AUTH_MTLS,
            issuer=certificate.issuer,
        )

    @staticmethod
    def _map(rule: PrincipalMap | None, field: str, certificate: _PeerCertificate, subject: str) -> str:
        if rule is None:
            return ""
        if callable(rule):
            return _text(rule(subject), field, _NAME_MAX)
        path = certificate.path
        for index, segment in enumerate(path[:-1]):
            if segment == rule:
                return _text(path[index + 1], field, _NAME_MAX)
        return ""


# -- trusted gateway ------------------------------------------------------------------------


class GatewayResolver:
    """The caller named by identity headers that a trusted gateway set.

    The headers are believed only when ``trust_peer`` says the immediate peer
    is the gateway (by default no peer is: see ``trust_networks``). From any
    other peer they are ignored, the envelope is flagged
    GATEWAY_HEADERS_UNTRUSTED and the resolver passes (returns None). Roles
    and the on-behalf-of chain are comma- or space-separated lists. A header
    name set to None is not read. ``issuer`` names the gateway in
    ``principal.issuer``.

    A trusted gateway's headers that name no subject, values that do not fit
    the contract, or a header sent more than once (a gateway that appends
    instead of replacing would leave the caller's own copy first) are refused
    with GATEWAY_HEADERS_INVALID.
    """

    def __init__(
        self,
        *,
        trust_peer: TrustPeer | None = None,
        subject_header: str = "x-gateway-subject",
        tenant_header: str | None = "x-gateway-tenant",
        project_header: str | None = "x-gateway-project",
        roles_header: str | None = "x-gateway-roles",
        kind_header: str | None = "x-gateway-principal-kind",
        on_behalf_of_header: str | None = "x-gateway-on-behalf-of",
        issuer: str = "",
        default_kind: PrincipalKind.ValueType = PRINCIPAL_USER,
    ) -> None:
        self._trust_peer = trust_peer
        self._subject = subject_header.lower()
        self._tenant = tenant_header.lower() if tenant_header else None
        self._project = project_header.lower() if project_header else None
        self._roles = roles_header.lower() if roles_header else None
        self._kind = kind_header.lower() if kind_header else None
        self._on_behalf_of = on_behalf_of_header.lower() if on_behalf_of_header else None
        self._headers = tuple(
            header
            for header in (
                self._subject,
                self._tenant,
                self._project,
                self._roles,
                self._kind,
                self._on_behalf_of,
            )
            if header
        )
        self._issuer = _text(issuer, "issuer", _ISSUER_MAX)
        self._default_kind = default_kind

    def __call__(self, call: CallInfo, /) -> Principal | None:
        """The gateway's principal; None when no header is present or the peer is not trusted."""
        metadata = call.metadata
        if not any(header in metadata for header in self._headers):
            return None
        if self._trust_peer is None or not self._trust_peer(call.peer):
            call.flags.append(FLAG_GATEWAY_HEADERS_UNTRUSTED)
            return None
        for header in self._headers:
            if header in call.repeated:  # appended, not replaced: one copy may be the caller's
                raise Unauthenticated("GATEWAY_HEADERS_INVALID", f"the gateway's {header} header is repeated")
        try:
            return self._principal(metadata)
        except _Invalid as invalid:
            raise Unauthenticated(
                "GATEWAY_HEADERS_INVALID", f"the gateway's {invalid.field} header is not usable"
            ) from None

    def _principal(self, metadata: Mapping[str, str | bytes]) -> Principal:
        def text(header: str | None, limit: int) -> str:
            return _text(metadata.get(header), header, limit) if header else ""

        def names(header: str | None, limit: int, item_max: int) -> list[str]:
            if not header:
                return []
            return _names(metadata.get(header), header, _COMMAS_OR_SPACES, limit, item_max)

        subject = text(self._subject, _SUBJECT_MAX)
        if not subject:
            raise _Invalid(self._subject)
        kind = _kind(metadata.get(self._kind)) if self._kind else None
        return Principal(
            subject=subject,
            kind=kind or self._default_kind,
            tenant=text(self._tenant, _NAME_MAX),
            project=text(self._project, _NAME_MAX),
            roles=names(self._roles, _ROLES_MAX, _NAME_MAX),
            auth_method=AUTH_GATEWAY,
            on_behalf_of=names(self._on_behalf_of, _ON_BEHALF_OF_MAX, _SUBJECT_MAX),
            issuer=self._issuer,
        )


def _peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a gRPC peer string ("ipv4:10.0.0.1:5000",
    "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000"); None for other transports."""
    family, _, rest = address.partition(":")
    if family not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]").partition("%")[0]
    try:
        found = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped
    return found


def trust_networks(*networks: str) -> TrustPeer:
    """A ``trust_peer`` predicate: true for a peer whose IP address lies in
    one of ``networks`` (addresses or CIDR blocks, e.g. "10.0.0.0/8",
    "::1"). Unix-socket and other non-IP peers are not trusted."""
    parsed = tuple(ipaddress.ip_network(network, strict=False) for network in networks)

    def trusted(peer: Peer) -> bool:
        address = _peer_ip(peer.address)
        return address is not None and any(address in network for network in parsed)

    return trusted
