"""envelope-grpc: execution envelopes for AI backends on gRPC.

The ``grpc`` flavour lives here; ``envelope_grpc.aio`` mirrors it for
``grpc.aio``.
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import server_interceptor as _otel_server_interceptor

from envelope_grpc._client import EnvelopeClientInterceptor
from envelope_grpc._core import EnvelopeConfig
from envelope_grpc._envelope import (
    LifecycleError,
    Violation,
    from_json,
    new_envelope,
    to_json,
    transition,
    validate,
)
from envelope_grpc._extract import Action, Extraction, Extractor, ExtractorRegistry
from envelope_grpc._handler import current_envelope, fail, record_binding, record_grant, record_usage, reject
from envelope_grpc._policy import Allow, Deny, Limit, LimitsPolicy, Narrow, Policy, PolicySpec, Verdict
from envelope_grpc._server import EnvelopeServerInterceptor
from envelope_grpc._sinks import JsonLinesSink, Sink, SinkDispatcher, SinkStats, WriteAheadSink
from envelope_grpc._types import CallInfo, Peer, Resolver, TrustPeer, Unauthenticated
from envelope_grpc.cedar import (
    CedarEvaluationError,
    CedarPolicy,
    CedarPolicyError,
    cedar_request,
    cedar_schema,
)
from envelope_grpc.identity import ClaimMap, GatewayResolver, JwtResolver, MtlsResolver, trust_networks
from envelope_grpc.ledger import Filters, Ledger, LedgerError, LedgerSink, open_ledger
from envelope_grpc.quota import Budget, MemoryQuotaStore, QuotaPolicy, QuotaStore, RedisQuotaStore

__all__ = [
    "Action",
    "Allow",
    "Budget",
    "CallInfo",
    "CedarEvaluationError",
    "CedarPolicy",
    "CedarPolicyError",
    "ClaimMap",
    "Deny",
    "EnvelopeClientInterceptor",
    "EnvelopeConfig",
    "EnvelopeServerInterceptor",
    "Extraction",
    "Extractor",
    "ExtractorRegistry",
    "Filters",
    "GatewayResolver",
    "JsonLinesSink",
    "JwtResolver",
    "Ledger",
    "LedgerError",
    "LedgerSink",
    "LifecycleError",
    "Limit",
    "LimitsPolicy",
    "MemoryQuotaStore",
    "MtlsResolver",
    "Narrow",
    "Peer",
    "Policy",
    "PolicySpec",
    "QuotaPolicy",
    "QuotaStore",
    "RedisQuotaStore",
    "Resolver",
    "Sink",
    "SinkDispatcher",
    "SinkStats",
    "TrustPeer",
    "Unauthenticated",
    "Verdict",
    "Violation",
    "WriteAheadSink",
    "cedar_request",
    "cedar_schema",
    "current_envelope",
    "fail",
    "from_json",
    "new_envelope",
    "open_ledger",
    "record_binding",
    "record_grant",
    "record_usage",
    "reject",
    "server_interceptors",
    "to_json",
    "transition",
    "trust_networks",
    "validate",
]


def server_interceptors(
    config: EnvelopeConfig | None = None, *, tracer_provider: Any = None
) -> list[grpc.ServerInterceptor]:
    """OpenTelemetry's server interceptor, then the envelope interceptor: the
    order in which envelope attributes land on the call's span."""
    return [_otel_server_interceptor(tracer_provider=tracer_provider), EnvelopeServerInterceptor(config)]  # type: ignore[no-untyped-call]
