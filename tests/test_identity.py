"""Identity resolvers: real tokens, real TLS, both server flavours."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_status import rpc_status
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from envelope_grpc import CallInfo, EnvelopeConfig, Peer, Unauthenticated, to_json, validate
from envelope_grpc.identity import ClaimMap, GatewayResolver, JwtResolver, MtlsResolver, trust_networks
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    DecisionOutcome,
    DenialBasis,
    EnvelopeFlag,
    ExecutionEnvelope,
    PrincipalKind,
)
from tests.conftest import Backend, error_info, server_span, states

RUN = "/envelope_grpc.testing.v1.ExecutionTestService/Run"
REQUEST = pb.RunRequest(model="llama-3-8b", max_tokens=16, behavior="ok")
ISSUER = "https://idp.example.org"
AUDIENCE = "inference-api"
SECRET = "hs256-test-secret-" + "q7Zx" * 8  # 50 bytes, distinctive enough to search for
Start = Callable[..., Backend]
K = PrincipalKind
A = AuthMethod
UNTRUSTED = EnvelopeFlag.ENVELOPE_FLAG_GATEWAY_HEADERS_UNTRUSTED


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid claim set; an override of None removes the claim."""
    now = int(time.time())
    found = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user:ada",
        "tenant": "acme",
        "project": "support",
        "roles": ["reader", "deployer"],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        **overrides,
    }
    return {key: value for key, value in found.items() if value is not None}


def hs256(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def hs_resolver(**options: Any) -> JwtResolver:
    return JwtResolver(keys=SECRET, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE, **options)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def assert_nowhere(
    secrets: Sequence[str],
    env: ExecutionEnvelope,
    span: ReadableSpan,
    logs: str,
    error: grpc.RpcError | None = None,
) -> None:
    """None of ``secrets`` is in the envelope's JSON, the span (attributes,
    events, status), the logs, or anything the client got back."""
    texts = [to_json(env), logs, span.status.description or ""]
    texts += [str(value) for value in attributes(span).values()]
    for event in span.events:
        texts += [event.name, *(str(value) for value in (event.attributes or {}).values())]
    if error is not None:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        texts += [error.details() or "", str(error), status.message, str(status)]
    for secret in secrets:
        assert secret
        assert not [text for text in texts if secret in text]


# -- JWT over both server flavours --------------------------------------------------------------


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_valid_hs256_token_names_the_principal(
    backend: Start, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = backend(EnvelopeConfig(resolvers=[hs_resolver(required=True)]))
    token = hs256()
    response = server.stub.Run(REQUEST, metadata=bearer(token))
    (env,) = server.envelopes(1)

    assert response.envelope_id == env.envelope_id
    principal = env.principal
    assert (principal.subject, principal.tenant, principal.project) == ("user:ada", "acme", "support")
    assert list(principal.roles) == ["reader", "deployer"]
    assert (principal.issuer, principal.kind, principal.auth_method) == (ISSUER, K.PRINCIPAL_KIND_USER, 2)
    assert principal.auth_method == A.AUTH_METHOD_JWT
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "COMPLETED"]
    assert validate(env) == []
    span = server_span(spans, RUN)
    found = attributes(span)
    assert found["execution_envelope.principal.subject"] == "user:ada"
    assert found["execution_envelope.principal.tenant"] == "acme"
    assert found["execution_envelope.principal.project"] == "support"
    assert found["execution_envelope.principal.kind"] == "user"
    assert found["execution_envelope.principal.auth_method"] == "jwt"
    assert_nowhere([token, *token.split(".")[1:], SECRET], env, span, caplog.text)


def test_es256_and_rs256_tokens_are_verified_by_key_id(
    backend: Start,
    spans: InMemorySpanExporter,
    ec_key: ec.EllipticCurvePrivateKey,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    rsa_pem = (
        rsa_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    resolver = JwtResolver(
        keys={"ec-2026": ec_key.public_key(), "rsa-2025": rsa_pem},  # a key object and a PEM string
        algorithms=["ES256", "RS256"],
        issuer=[ISSUER, "https://old-idp.example.org"],
        audience=AUDIENCE,
    )
    server = backend(EnvelopeConfig(resolvers=[resolver]))
    service = claims(sub="svc:indexer", principal_kind="service", roles="index write", tenant="globex")
    es = jwt.encode(service, ec_key, algorithm="ES256", headers={"kid": "ec-2026"})
    rs = jwt.encode(
        claims(iss="https://old-idp.example.org", sub="agent:triage", principal_kind="agent", project=None),
        rsa_key,
        algorithm="RS256",
        headers={"kid": "rsa-2025"},
    )
    server.stub.Run(REQUEST, metadata=bearer(es))
    server.stub.Run(REQUEST, metadata=bearer(rs))
    first, second = (env.principal for env in server.envelopes(2))

    assert (first.subject, first.kind, first.tenant, first.project) == (
        "svc:indexer",
        K.PRINCIPAL_KIND_SERVICE,
        "globex",
        "support",
    )
    assert (list(first.roles), first.issuer, first.auth_method) == (
        ["index", "write"],
        ISSUER,
        A.AUTH_METHOD_JWT,
    )
    assert (second.subject, second.kind, second.tenant, second.project) == (
        "agent:triage",
        K.PRINCIPAL_KIND_AGENT,
        "acme",
        "",
    )
    assert (second.issuer, second.auth_method) == ("https://old-idp.example.org", A.AUTH_METHOD_JWT)
    for index, (subject, tenant) in enumerate((("svc:indexer", "globex"), ("agent:triage", "acme")), 1):
        found = attributes(server_span(spans, RUN, index))
        assert found["execution_envelope.principal.subject"] == subject
        assert found["execution_envelope.principal.tenant"] == tenant


def forged() -> str:
    return hs256(secret="another-secret-of-the-attacker-" + "x" * 20)


def unsigned() -> str:
    return jwt.encode(claims(), "", algorithm="none")


REFUSED: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (lambda: hs256(exp=int(time.time()) - 120, iat=int(time.time()) - 900), "TOKEN_EXPIRED"),
    "forged": (forged, "TOKEN_INVALID_SIGNATURE"),
    "unsigned": (unsigned, "TOKEN_INVALID_SIGNATURE"),
    "wrong_audience": (lambda: hs256(aud="billing-api"), "TOKEN_WRONG_AUDIENCE"),
    "wrong_issuer": (lambda: hs256(iss="https://idp.evil.example"), "TOKEN_WRONG_ISSUER"),
    "not_yet_valid": (lambda: hs256(nbf=int(time.time()) + 300), "TOKEN_NOT_YET_VALID"),
    "malformed": (lambda: "not-a-token", "TOKEN_MALFORMED"),
    "garbled": (lambda: "bm90LWpzb24.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "TOKEN_MALFORMED"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_token_is_refused_with_its_reason_and_leaks_nothing(
    backend: Start, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)
    make, reason = REFUSED[case]
    token = make()
    server = backend(EnvelopeConfig(resolvers=[hs_resolver()]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(REQUEST, metadata=bearer(token))
    (env,) = server.envelopes(1)

    error = caught.value
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    info = error_info(error)
    assert (info.reason, info.domain) == (reason, "envelope-grpc")
    assert dict(info.metadata) == {"envelope_id": env.envelope_id, "policy": "identity"}
    assert states(env) == ["RECEIVED", "NORMALIZED", "REJECTED"]
    decision = env.decision
    assert (decision.outcome, decision.reason_code, decision.deciding_policy) == (
        DecisionOutcome.DECISION_OUTCOME_DENIED,
        reason,
        "identity",
    )
    assert (env.outcome.reason_code, env.outcome.status_code) == (
        reason,
        grpc.StatusCode.UNAUTHENTICATED.value[0],
    )
    assert (env.principal.kind, env.principal.subject) == (K.PRINCIPAL_KIND_ANONYMOUS, "")
    assert len(env.grants) == 0
    assert validate(env) == []
    span = server_span(spans, RUN)
    assert attributes(span)["execution_envelope.decision.reason_code"] == reason
    secrets = [token, SECRET, *(part for part in token.split(".")[1:] if len(part) > 8)]
    assert_nowhere(secrets, env, span, caplog.text, error)


def test_expiry_and_not_before_within_the_leeway_are_accepted(backend: Start) -> None:
    server = backend(EnvelopeConfig(resolvers=[hs_resolver(leeway=datetime.timedelta(seconds=30))]))
    now = int(time.time())
    server.stub.Run(REQUEST, metadata=bearer(hs256(exp=now - 10, iat=now - 600, nbf=now - 600)))
    server.stub.Run(REQUEST, metadata=bearer(hs256(nbf=now + 10, iat=now)))
    for env in server.envelopes(2):
        assert (env.principal.subject, states(env)[-1]) == ("user:ada", "COMPLETED")


def test_required_token_missing_is_refused(backend: Start) -> None:
    server = backend(EnvelopeConfig(resolvers=[hs_resolver(required=True)]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(REQUEST, metadata=(("authorization", "Basic dXNlcjpwYXNz"),))
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "CREDENTIAL_MISSING"
    assert caught.value.details() == "a bearer token is required"
    assert (env.decision.outcome, env.decision.reason_code) == (
        DecisionOutcome.DECISION_OUTCOME_DENIED,
        "CREDENTIAL_MISSING",
    )
    assert states(env)[-1] == "REJECTED"
    assert validate(env) == []


def test_optional_token_missing_leaves_the_caller_anonymous(backend: Start) -> None:
    server = backend(EnvelopeConfig(resolvers=[hs_resolver()]))
    server.stub.Run(REQUEST)
    (env,) = server.envelopes(1)
    assert (env.principal.kind, env.principal.auth_method, env.principal.subject) == (
        K.PRINCIPAL_KIND_ANONYMOUS,
        A.AUTH_METHOD_NONE,
        "",
    )
    assert states(env)[-1] == "COMPLETED"


def test_a_tenant_the_request_declares_never_overrides_the_token(backend: Start) -> None:
    server = backend(EnvelopeConfig(resolvers=[hs_resolver()]))
    server.stub.Run(pb.RunRequest(model="m", tenant="globex"), metadata=bearer(hs256()))
    server.stub.Run(pb.RunRequest(model="m", tenant="globex"), metadata=bearer(hs256(tenant=None)))
    server.stub.Run(pb.RunRequest(model="m", tenant="globex"))
    with_tenant, without_tenant, anonymous = server.envelopes(3)
    assert (with_tenant.principal.tenant, dict(with_tenant.scope.hints)) == (
        "acme",
        {"declared_tenant": "globex"},
    )
    assert (without_tenant.principal.tenant, dict(without_tenant.scope.hints)) == (
        "",
        {"declared_tenant": "globex"},
    )
    assert (anonymous.principal.tenant, dict(anonymous.scope.hints)) == ("globex", {})


# -- gateway headers -----------------------------------------------------------------------------

GATEWAY_HEADERS = (
    ("x-gateway-subject", "agent:support-triage"),
    ("x-gateway-tenant", "acme"),
    ("x-gateway-project", "support-assistant"),
    ("x-gateway-roles", "agent, reader"),
    ("x-gateway-principal-kind", "agent"),
    ("x-gateway-on-behalf-of", "user:ada@example.com"),
)


@pytest.mark.parametrize("trust_peer", [None, trust_networks("10.0.0.0/8")], ids=["nobody", "elsewhere"])
def test_gateway_headers_from_an_untrusted_peer_are_ignored_and_flagged(
    backend: Start, spans: InMemorySpanExporter, trust_peer: Any
) -> None:
    server = backend(EnvelopeConfig(resolvers=[GatewayResolver(trust_peer=trust_peer)]))
    server.stub.Run(REQUEST, metadata=GATEWAY_HEADERS)
    (env,) = server.envelopes(1)
    principal = env.principal
    assert (principal.subject, principal.tenant, list(principal.roles)) == ("", "", [])
    assert (principal.kind, principal.auth_method) == (K.PRINCIPAL_KIND_ANONYMOUS, A.AUTH_METHOD_NONE)
    assert list(env.flags) == [UNTRUSTED]
    assert states(env)[-1] == "COMPLETED"
    found = attributes(server_span(spans, RUN))
    assert found["execution_envelope.flags"] == ("gateway_headers_untrusted",)
    assert "execution_envelope.principal.subject" not in found


def test_gateway_headers_from_the_trusted_gateway_are_accepted(
    backend: Start, spans: InMemorySpanExporter
) -> None:
    gateway = GatewayResolver(trust_peer=trust_networks("127.0.0.1", "::1"), issuer="gateway.acme.internal")
    server = backend(EnvelopeConfig(resolvers=[gateway]))
    server.stub.Run(REQUEST, metadata=GATEWAY_HEADERS)
    (env,) = server.envelopes(1)
    principal = env.principal
    assert (principal.subject, principal.tenant, principal.project) == (
        "agent:support-triage",
        "acme",
        "support-assistant",
    )
    assert (list(principal.roles), list(principal.on_behalf_of)) == (
        ["agent", "reader"],
        ["user:ada@example.com"],
    )
    assert (principal.kind, principal.auth_method, principal.issuer) == (
        K.PRINCIPAL_KIND_AGENT,
        A.AUTH_METHOD_GATEWAY,
        "gateway.acme.internal",
    )
    assert list(env.flags) == []
    assert validate(env) == []
    found = attributes(server_span(spans, RUN))
    assert found["execution_envelope.principal.subject"] == "agent:support-triage"
    assert found["execution_envelope.principal.auth_method"] == "gateway"


def test_resolver_chain_takes_the_first_that_answers(backend: Start) -> None:
    gateway = GatewayResolver(trust_peer=trust_networks("127.0.0.1"))
    server = backend(EnvelopeConfig(resolvers=[hs_resolver(), gateway]))
    server.stub.Run(REQUEST, metadata=bearer(hs256()) + GATEWAY_HEADERS)
    server.stub.Run(REQUEST, metadata=GATEWAY_HEADERS)
    server.stub.Run(REQUEST)
    with pytest.raises(grpc.RpcError) as caught:  # a refusal ends the chain
        server.stub.Run(REQUEST, metadata=bearer(forged()) + GATEWAY_HEADERS)
    envelopes = server.envelopes(4)
    assert [(env.principal.subject, env.principal.auth_method) for env in envelopes] == [
        ("user:ada", A.AUTH_METHOD_JWT),
        ("agent:support-triage", A.AUTH_METHOD_GATEWAY),
        ("", A.AUTH_METHOD_NONE),
        ("", A.AUTH_METHOD_NONE),
    ]
    assert error_info(caught.value).reason == "TOKEN_INVALID_SIGNATURE"
    assert envelopes[3].decision.reason_code == "TOKEN_INVALID_SIGNATURE"


def _unreachable(call: CallInfo) -> Any:
    raise ConnectionError("directory unreachable")


def _sloppy(call: CallInfo) -> Any:
    return {"subject": "user:ada"}  # not a Principal


@pytest.mark.parametrize(
    ("directory", "error"),
    [(_unreachable, "ConnectionError"), (_sloppy, "TypeError")],
    ids=["raises", "returns-no-principal"],
)
def test_a_failing_identity_source_admits_nobody(backend: Start, directory: Any, error: str) -> None:
    server = backend(EnvelopeConfig(resolvers=[directory, hs_resolver()]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(REQUEST, metadata=bearer(hs256()))
    (env,) = server.envelopes(1)
    assert (caught.value.code(), caught.value.details(), error_info(caught.value).reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        f"identity could not be resolved ({error})",
        "IDENTITY_ERROR",
    )
    assert (env.principal.subject, env.principal.auth_method) == ("", A.AUTH_METHOD_NONE)
    assert (env.decision.deciding_policy, env.decision.denial_basis) == (
        "identity",
        DenialBasis.DENIAL_BASIS_ERROR,
    )
    assert validate(env) == []


def test_repeated_identity_headers_are_refused_not_resolved_first_wins(backend: Start) -> None:
    # A gateway that appends its identity headers leaves the caller's own copy first.
    gateway = GatewayResolver(trust_peer=trust_networks("127.0.0.1"))
    server = backend(EnvelopeConfig(resolvers=[hs_resolver(), gateway]))
    appended = (("x-gateway-subject", "user:mallory"), *GATEWAY_HEADERS)
    twice = bearer(hs256(sub="user:mallory")) + bearer(hs256())
    refusals = []
    for metadata in (appended, twice):
        with pytest.raises(grpc.RpcError) as caught:
            server.stub.Run(REQUEST, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refusals.append((error_info(caught.value).reason, caught.value.details()))
    assert refusals == [
        ("GATEWAY_HEADERS_INVALID", "the gateway's x-gateway-subject header is repeated"),
        ("CREDENTIAL_AMBIGUOUS", "more than one authorization header was sent"),
    ]
    envelopes = server.envelopes(2)
    assert [(env.principal.subject, env.decision.reason_code) for env in envelopes] == [
        ("", "GATEWAY_HEADERS_INVALID"),
        ("", "CREDENTIAL_AMBIGUOUS"),
    ]


# -- mTLS over real TLS --------------------------------------------------------------------------

CA_NAME = "envelope test CA"
SPIFFE_ID = "spiffe://example.org/ns/acme/sa/inference"


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: bytes
    server_key: bytes
    server_cert: bytes
    client_key: bytes
    client_cert: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def pki() -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client
    certificate with a SPIFFE ID."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        common_name: str, names: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return private, cert.public_bytes(serialization.Encoding.PEM)

    server_key, server_cert = issue(
        "localhost",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_key, client_cert = issue(
        "inference-client", [x509.UniformResourceIdentifier(SPIFFE_ID)], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM), server_key, server_cert, client_key, client_cert)


@pytest.fixture
def tls_server(backend: Start, pki: Pki) -> Callable[..., Backend]:
    """Start a TLS server of the test's flavour: tls_server(config, client_auth=True);
    its client presents the client certificate when ``client_auth``."""

    def start(config: EnvelopeConfig, *, client_auth: bool = True) -> Backend:
        server_credentials = grpc.ssl_server_credentials(
            [(pki.server_key, pki.server_cert)], root_certificates=pki.ca, require_client_auth=client_auth
        )
        client = (pki.ca, pki.client_key, pki.client_cert) if client_auth else (pki.ca,)
        return backend(
            config,
            server_credentials=server_credentials,
            channel_credentials=grpc.ssl_channel_credentials(*client),
        )

    return start


def test_client_certificate_names_a_service(
    tls_server: Callable[..., Backend], spans: InMemorySpanExporter
) -> None:
    resolver = MtlsResolver(required=True, tenant="ns", project=lambda subject: subject.rpartition("/")[2])
    server = tls_server(EnvelopeConfig(resolvers=[resolver]))
    server.stub.Run(REQUEST)
    (env,) = server.collector.wait(1)
    principal = env.principal
    assert (principal.subject, principal.kind, principal.auth_method, principal.issuer) == (
        SPIFFE_ID,
        K.PRINCIPAL_KIND_SERVICE,
        A.AUTH_METHOD_MTLS,
        CA_NAME,
    )
    assert (principal.tenant, principal.project) == ("acme", "inference")
    assert principal.source_address.startswith("ipv4:127.0.0.1:")
    assert states(env)[-1] == "COMPLETED"
    assert validate(env) == []
    found = attributes(server_span(spans, RUN))
    assert found["execution_envelope.principal.subject"] == SPIFFE_ID
    assert found["execution_envelope.principal.auth_method"] == "mtls"


@pytest.mark.parametrize("required", [True, False])
def test_no_client_certificate(tls_server: Callable[..., Backend], required: bool) -> None:
    server = tls_server(EnvelopeConfig(resolvers=[MtlsResolver(required=required)]), client_auth=False)
    if required:
        with pytest.raises(grpc.RpcError) as caught:
            server.stub.Run(REQUEST)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == "CREDENTIAL_MISSING"
    else:
        server.stub.Run(REQUEST)
    (env,) = server.collector.wait(1)
    assert (env.principal.kind, env.principal.auth_method) == (K.PRINCIPAL_KIND_ANONYMOUS, A.AUTH_METHOD_NONE)
    assert states(env)[-1] == ("REJECTED" if required else "COMPLETED")


def test_client_certificate_of_a_foreign_trust_domain_is_refused(
    tls_server: Callable[..., Backend],
) -> None:
    server = tls_server(EnvelopeConfig(resolvers=[MtlsResolver(trust_domains={"prod.example.org"})]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(REQUEST)
    assert error_info(caught.value).reason == "CERTIFICATE_UNTRUSTED_DOMAIN"
    (env,) = server.collector.wait(1)
    assert env.decision.reason_code == "CERTIFICATE_UNTRUSTED_DOMAIN"


# -- resolvers without a server --------------------------------------------------------------------

LOCAL = Peer("ipv4:127.0.0.1:5000", {})


def call(*metadata: tuple[str, str], peer: Peer = LOCAL) -> CallInfo:
    return CallInfo(RUN, dict(metadata), peer)


def refusal(resolver: Any, info: CallInfo) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        resolver(info)
    return caught.value


def test_claim_map_reads_nested_claims_numbers_and_space_separated_roles() -> None:
    resolver = hs_resolver(claims=ClaimMap(tenant="org_id", roles=("realm_access", "roles")))
    token = hs256(org_id=4711, realm_access={"roles": "admin  viewer admin"}, roles=None)
    principal = resolver(call(*bearer(token)))
    assert principal is not None
    assert (principal.tenant, list(principal.roles)) == ("4711", ["admin", "viewer"])


def test_actor_claim_makes_the_actor_the_caller() -> None:
    # RFC 8693: svc-b acts now, svc-a acted before it, both for user:ada.
    token = hs256(act={"sub": "svc-b", "principal_kind": "agent", "act": {"sub": "svc-a"}})
    principal = hs_resolver()(call(*bearer(token)))
    assert principal is not None
    assert (principal.subject, principal.kind) == ("svc-b", K.PRINCIPAL_KIND_AGENT)
    assert list(principal.on_behalf_of) == ["user:ada", "svc-a"]


def test_obo_claim_and_client_credentials_kind() -> None:
    token = hs256(sub="client-7", azp="client-7", obo=["user:ada", "user:bob"])
    principal = hs_resolver()(call(*bearer(token)))
    assert principal is not None
    assert (principal.subject, principal.kind) == ("client-7", K.PRINCIPAL_KIND_SERVICE)
    assert list(principal.on_behalf_of) == ["user:ada", "user:bob"]


def test_public_key_is_never_used_as_an_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic algorithm confusion: HS256 "signed" with the RSA public key's PEM.
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    resolver = JwtResolver(keys=pem, algorithms=["RS256", "HS256"], issuer=ISSUER, audience=AUDIENCE)
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims()).encode())
    signature = b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    refused = refusal(resolver, call(*bearer(f"{signing_input}.{signature}")))
    assert (refused.reason_code, refused.message) == (
        "TOKEN_INVALID_SIGNATURE",
        "the bearer token's algorithm is not accepted",
    )


def test_key_ids_and_rotation(ec_key: ec.EllipticCurvePrivateKey) -> None:
    newer = ec.generate_private_key(ec.SECP256R1())
    resolver = JwtResolver(
        keys={"k1": ec_key.public_key()}, algorithms=["ES256"], issuer=ISSUER, audience=AUDIENCE
    )
    old = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "k1"})
    new = jwt.encode(claims(), newer, algorithm="ES256", headers={"kid": "k2"})
    assert resolver(call(*bearer(old))) is not None
    assert refusal(resolver, call(*bearer(new))).reason_code == "TOKEN_INVALID_SIGNATURE"
    resolver.update_keys({"k1": ec_key.public_key(), "k2": newer.public_key()})
    assert resolver(call(*bearer(new))) is not None
    wrong = jwt.encode(claims(), newer, algorithm="ES256", headers={"kid": "k1"})
    assert refusal(resolver, call(*bearer(wrong))).reason_code == "TOKEN_INVALID_SIGNATURE"


@pytest.mark.parametrize(
    ("token", "reason", "message"),
    [
        (lambda: hs256(exp=None), "TOKEN_MALFORMED", "the bearer token lacks the exp claim"),
        (lambda: hs256(aud=None), "TOKEN_WRONG_AUDIENCE", "the bearer token names no audience"),
        (lambda: hs256(sub=None), "TOKEN_MALFORMED", "the bearer token's sub claim is not usable"),
        (lambda: hs256(tenant="t" * 129), "TOKEN_MALFORMED", "the bearer token's tenant claim is not usable"),
        (lambda: "e" * 9000 + ".e.e", "TOKEN_MALFORMED", "the bearer token is malformed"),
    ],
    ids=["no-exp", "no-aud", "no-sub", "long-tenant", "oversized"],
)
def test_unusable_tokens_are_refused(token: Callable[[], str], reason: str, message: str) -> None:
    text = token()
    refused = refusal(hs_resolver(), call(*bearer(text)))
    assert (refused.reason_code, refused.message) == (reason, message)
    assert text not in str(refused)


def test_bad_configuration_is_refused_at_construction(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="algorithms not supported"):
        JwtResolver(keys=SECRET, algorithms=["none", "HS256"], issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ValueError, match="shorter than the 32 bytes HS256 needs"):
        JwtResolver(keys="short", algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ValueError, match="fits none of the allowed algorithms"):
        JwtResolver(keys=rsa_key.public_key(), algorithms=["ES256"], issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ValueError, match="not a PEM public key"):
        JwtResolver(
            keys="-----BEGIN PUBLIC KEY-----\nxx\n", algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE
        )
    with pytest.raises(ValueError, match="issuer"):
        JwtResolver(keys=SECRET, algorithms=["HS256"], issuer=[], audience=AUDIENCE)


def test_other_authorization_schemes_are_not_bearer_tokens() -> None:
    assert hs_resolver()(call(("authorization", "Basic dXNlcjpwYXNz"))) is None
    refused = refusal(hs_resolver(required=True), call(("authorization", "Basic dXNlcjpwYXNz")))
    assert refused.reason_code == "CREDENTIAL_MISSING"


def test_gateway_header_values_are_cleaned_and_bounded() -> None:
    gateway = GatewayResolver(trust_peer=trust_networks("127.0.0.1"))
    principal = gateway(
        call(("x-gateway-subject", "user:\x1b[31mada\u202e\x00"), ("x-gateway-roles", "a,\tb,,a"))
    )
    assert principal is not None
    assert (principal.subject, list(principal.roles)) == ("user:[31mada", ["a", "b"])
    long_subject = "user:" + "z" * 300
    refused = refusal(gateway, call(("x-gateway-subject", long_subject)))
    assert (refused.reason_code, refused.message) == (
        "GATEWAY_HEADERS_INVALID",
        "the gateway's x-gateway-subject header is not usable",
    )
    refused = refusal(gateway, call(("x-gateway-tenant", "acme")))
    assert refused.message == "the gateway's x-gateway-subject header is not usable"
    info = call()
    assert gateway(info) is None
    assert info.flags == []  # no headers, nothing to flag


def test_trust_networks_reads_grpc_peer_addresses() -> None:
    trusted = trust_networks("10.0.0.0/8", "::1")
    assert [
        trusted(Peer(address, {}))
        for address in (
            "ipv4:10.1.2.3:5000",
            "ipv4:11.1.2.3:5000",
            "ipv6:[::1]:5000",
            "ipv6:%5B::1%5D:5000",
            "ipv6:[::ffff:10.0.0.7]:5000",
            "unix:/tmp/socket",
            "garbage",
        )
    ] == [True, False, True, True, True, False, False]


def test_certificate_identity_without_a_server(pki: Pki) -> None:
    context = {"transport_security_type": [b"ssl"], "x509_pem_cert": [pki.client_cert]}
    principal = MtlsResolver(tenant=lambda subject: "tenant\x00-" + subject[-3:])(
        call(peer=Peer("ipv4:127.0.0.1:5000", context))
    )
    assert principal is not None
    assert (principal.subject, principal.tenant, principal.issuer) == (SPIFFE_ID, "tenant-nce", CA_NAME)
    assert (
        MtlsResolver()(call(peer=Peer("ipv4:127.0.0.1:5000", {"transport_security_type": [b"insecure"]})))
        is None
    )
    garbled = {"transport_security_type": [b"ssl"], "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nAA\n"]}
    refused = refusal(MtlsResolver(), call(peer=Peer("ipv4:127.0.0.1:5000", garbled)))
    assert refused.reason_code == "CERTIFICATE_INVALID"
