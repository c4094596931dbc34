"""The server and client interceptors against real grpc and grpc.aio servers."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import envelope_grpc
import envelope_grpc.aio
from envelope_grpc import (
    Action,
    Allow,
    Deny,
    EnvelopeConfig,
    Extraction,
    ExtractorRegistry,
    Limit,
    LimitsPolicy,
    Narrow,
    PolicySpec,
    _core,
    to_json,
    validate,
)
from envelope_grpc import _envelope as model
from envelope_grpc._core import Call
from envelope_grpc._envelope import blank_envelope
from envelope_grpc._policy import Admission, admit
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc
from envelope_grpc.v1 import options_pb2
from envelope_grpc.v1.envelope_pb2 import (
    DecisionOutcome,
    EnforcementMode,
    EnvelopeContext,
    EnvelopeFlag,
    ExecutionEnvelope,
    ExecutionKind,
    GrantStage,
    ResourceDimension,
    Resources,
    Target,
    Usage,
)
from envelope_grpc.v1.options_pb2 import FieldRule, ScopeField, TargetField
from tests.conftest import (
    COMPLETED_PATH,
    Backend,
    error_info,
    refusal_of,
    refused,
    server_span,
    states,
    transitions,
    wait_until,
)

#: The flavours, and grpc.aio serving plain functions and generators on its threads.
FLAVORS_AND_PLAIN_AIO = ["grpc", "aio", "aio-sync"]
SERVICE = "/envelope_grpc.testing.v1.ExecutionTestService"
O = DecisionOutcome  # noqa: E741
Start = Callable[..., Backend]


def trailers(call: Any) -> dict[str, str]:
    return {key: value for key, value in call.trailing_metadata() if not key.endswith("-bin")}


RUN = pb.RunRequest(
    model="llama-3-8b",
    version="7",
    tenant="acme",
    max_tokens=512,
    accelerators=pb.Accelerators(count=2, type="nvidia-a100", memory_gib=40),
    shards=[pb.Shard(replicas=2, dataset="wiki"), pb.Shard(replicas=3, dataset="books")],
    region="eu-west",
    classification="confidential",
    engine="vllm",
    purpose="support-bot",
    behavior="ok",
)


def test_unary_call_builds_a_complete_envelope(backend: Start, spans: InMemorySpanExporter) -> None:
    server = backend()
    response, call = server.stub.Run.with_call(RUN, metadata=(("x-request-id", "req-123"),))
    (env,) = server.envelopes(1)

    assert response.envelope_id == env.envelope_id
    assert env.request_id == "req-123"
    assert env.execution.method == f"{SERVICE}/Run"
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_INFERENCE
    assert env.execution.target == Target(
        type="model", name="llama-3-8b", version="7", attributes={"engine": "vllm"}
    )
    assert env.execution.request_digest == "sha256:" + hashlib.sha256(RUN.SerializeToString()).hexdigest()
    assert env.principal.tenant == "acme"
    assert env.principal.source_address.startswith("ipv4:127.0.0.1:")
    assert env.principal.user_agent.startswith("grpc-python/")
    requested = env.requested
    assert (requested.tokens, requested.accelerator_count, requested.accelerator_type) == (
        512,
        2,
        "nvidia-a100",
    )
    assert requested.accelerator_memory_bytes == 40 << 30
    assert requested.replicas_max == 5
    assert not requested.HasField("memory_bytes")
    assert list(env.scope.datasets) == ["wiki", "books"]
    assert (env.scope.region, env.scope.data_classification) == ("eu-west", 3)
    assert dict(env.scope.hints) == {"purpose": "support-bot"}
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "COMPLETED"]
    assert [step.actor for step in env.lifecycle.transitions] == [
        "receiver",
        "extractor",
        "admission",
        "completion",
    ]
    assert env.decision.outcome == O.DECISION_OUTCOME_ADMITTED
    assert [(g.stage, g.outcome) for g in env.grants] == [
        (GrantStage.GRANT_STAGE_ADMISSION, O.DECISION_OUTCOME_ADMITTED)
    ]
    assert env.outcome.status_code == 0
    assert (env.outcome.usage.request_messages, env.outcome.usage.response_messages) == (1, 1)
    assert env.outcome.usage.request_bytes == RUN.ByteSize()
    assert validate(env) == []
    assert trailers(call) == {
        "x-execution-envelope-id": env.envelope_id,
        "x-execution-envelope-decision": "admitted",
    }

    span = server_span(spans, f"{SERVICE}/Run")
    assert env.trace_id == format(span.context.trace_id, "032x")
    assert env.span_id == format(span.context.span_id, "016x")
    attributes = {
        key: value for key, value in (span.attributes or {}).items() if key.startswith("execution_envelope.")
    }
    assert attributes == {
        "execution_envelope.id": env.envelope_id,
        "execution_envelope.request_id": "req-123",
        "execution_envelope.kind": "inference",
        "execution_envelope.state": "completed",
        "execution_envelope.decision.outcome": "admitted",
        "execution_envelope.principal.kind": "anonymous",
        "execution_envelope.principal.auth_method": "none",
        "execution_envelope.principal.tenant": "acme",
        "execution_envelope.target.type": "model",
        "execution_envelope.target.name": "llama-3-8b",
        "execution_envelope.target.version": "7",
        "execution_envelope.scope.region": "eu-west",
        "execution_envelope.scope.data_classification": "confidential",
        "execution_envelope.requested.accelerator_count": 2,
        "execution_envelope.requested.accelerator_memory_bytes": 40 << 30,
        "execution_envelope.requested.replicas_max": 5,
        "execution_envelope.requested.tokens": 512,
        "execution_envelope.requested.accelerator_type": "nvidia-a100",
        "execution_envelope.lifecycle": attributes["execution_envelope.lifecycle"],
    }
    assert len(span.attributes or {}) < 64
    assert list(span.events) == []  # a plain path is told by the lifecycle attributes alone


def test_lifecycle_path_and_informative_steps_are_on_the_span(
    backend: Start, spans: InMemorySpanExporter
) -> None:
    server = backend()
    server.stub.Run(pb.RunRequest(model="m", accelerators=pb.Accelerators(count=2), behavior="bind"))
    (env,) = server.envelopes(1)
    span = server_span(spans, f"{SERVICE}/Run")
    attributes = span.attributes or {}
    start = env.lifecycle.start_time.ToNanoseconds()
    steps = env.lifecycle.transitions
    names = ("received", "normalized", "admitted", "granted", "bound", "completed")
    offsets = [(step.time.ToNanoseconds() - start) // 1000 for step in steps]
    assert attributes["execution_envelope.lifecycle"] == " ".join(
        f"{name}:{offset}" for name, offset in zip(names, offsets, strict=True)
    )
    events = [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events]
    granted = {"actor": "backend", "reason": "MEMORY_COMPUTED"}
    assert events == [
        ("execution_envelope.granted", granted, steps[3].time.ToNanoseconds()),
        ("execution_envelope.bound", {"actor": "backend"}, steps[4].time.ToNanoseconds()),
    ]


def test_streams_and_grants_that_differ_add_their_attributes(
    backend: Start, spans: InMemorySpanExporter
) -> None:
    server = backend(EnvelopeConfig(policies=[LimitsPolicy([Limit(TOKENS, 100)])]))
    list(server.stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", max_tokens=500, count=2))))
    (env,) = server.envelopes(1)
    span = server_span(spans, f"{SERVICE}/Watch")
    attributes = span.attributes or {}
    assert attributes["execution_envelope.requested.tokens"] == 500
    assert attributes["execution_envelope.granted.tokens"] == 100
    assert attributes["execution_envelope.decision.policy"] == "limits"
    assert attributes["execution_envelope.decision.reason_code"] == "LIMIT_NARROWED"
    assert attributes["execution_envelope.usage.response_messages"] == 2
    assert attributes["execution_envelope.usage.request_messages"] == 1
    assert attributes["execution_envelope.usage.duration_ms"] == env.outcome.usage.duration_ms
    admitted = [e for e in span.events if e.name == "execution_envelope.admitted"]
    assert [dict(e.attributes or {}) for e in admitted] == [
        {"actor": "admission", "reason": "LIMIT_NARROWED"}
    ]


def test_request_id_that_is_not_printable_ascii_is_replaced(backend: Start) -> None:
    server = backend()
    server.stub.Run(RUN, metadata=(("x-request-id", "bad id with spaces"),))
    (env,) = server.envelopes(1)
    assert env.request_id != "bad id with spaces"
    assert len(env.request_id) == 32


def test_handler_records_grant_and_binding(backend: Start) -> None:
    server = backend()
    server.stub.Run(pb.RunRequest(model="m", accelerators=pb.Accelerators(count=2), behavior="bind"))
    (env,) = server.envelopes(1)
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "GRANTED", "BOUND", "COMPLETED"]
    final = env.grants[1]
    assert final.stage == GrantStage.GRANT_STAGE_BACKEND
    assert final.outcome == O.DECISION_OUTCOME_WIDENED
    assert (final.reason_code, final.resources.memory_bytes) == ("MEMORY_COMPUTED", 8 << 30)
    assert (env.binding.node, list(env.binding.accelerator_indexes), env.binding.endpoint) == (
        "node-a",
        [0, 1],
        "10.0.0.5:8001",
    )
    assert validate(env) == []


def test_handler_usage_is_recorded(backend: Start) -> None:
    server = backend()
    server.stub.Run(pb.RunRequest(model="m", behavior="usage"))
    (env,) = server.envelopes(1)
    assert env.outcome.usage.tokens == 42


def test_backend_rejection_aborts_with_error_info(backend: Start) -> None:
    server = backend()
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(pb.RunRequest(model="m", behavior="reject"))
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert (info.reason, info.domain, info.metadata["envelope_id"]) == (
        "INSUFFICIENT_CAPACITY",
        "envelope-grpc",
        env.envelope_id,
    )
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "REJECTED"]
    assert env.outcome.reason_code == "INSUFFICIENT_CAPACITY"
    assert validate(env) == []
    keys = [key for key, _ in caught.value.trailing_metadata()]  # type: ignore[attr-defined]
    assert keys.count("x-execution-envelope-id") == keys.count("x-execution-envelope-decision") == 1


def test_backend_failure_aborts_with_error_info_and_ends_failed_with_its_reason(backend: Start) -> None:
    server = backend()
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(pb.RunRequest(model="m", behavior="unavailable"))
    (env,) = server.envelopes(1)
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "the model is not loaded",
    )
    info = error_info(caught.value)
    assert (info.reason, info.metadata["envelope_id"]) == ("MODEL_UNAVAILABLE", env.envelope_id)
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "FAILED"]
    assert (env.outcome.reason_code, env.outcome.status_code) == ("MODEL_UNAVAILABLE", 14)
    assert validate(env) == []


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
@pytest.mark.parametrize(
    ("behavior", "code"),
    [
        ("fail", grpc.StatusCode.UNKNOWN),
        ("abort", grpc.StatusCode.NOT_FOUND),
        ("abort_own", grpc.StatusCode.NOT_FOUND),
        ("set_code", grpc.StatusCode.ALREADY_EXISTS),
    ],
)
def test_handler_failure_is_recorded(backend: Start, behavior: str, code: grpc.StatusCode) -> None:
    server = backend()
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(pb.RunRequest(model="m", behavior=behavior))
    (env,) = server.envelopes(1)
    assert caught.value.code() is code
    assert states(env)[-1] == "FAILED"
    assert env.outcome.status_code == code.value[0]
    assert validate(env) == []
    metadata = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert metadata["x-execution-envelope-id"] == env.envelope_id
    assert metadata["x-execution-envelope-decision"] == "admitted"
    if behavior in ("set_code", "abort_own"):
        assert metadata["x-handler"] == "own"


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
@pytest.mark.parametrize("behavior", ["sleep", "busy"])
def test_deadline_cancels_the_envelope(backend: Start, behavior: str) -> None:
    server = backend()
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(pb.RunRequest(model="m", behavior=behavior), timeout=0.1)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    (env,) = server.envelopes(1)
    assert states(env)[-1] == "CANCELLED"
    assert env.outcome.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert env.execution.HasField("deadline")
    assert validate(env) == []


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
def test_a_request_stream_whose_deadline_passes_before_its_first_message_is_recorded(
    backend: Start,
) -> None:
    server = backend()

    def late() -> Iterator[pb.UploadRequest]:
        time.sleep(0.6)
        yield pb.UploadRequest(destination="s3-eu", data=b"x")

    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Upload(late(), timeout=0.2)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    (env,) = server.envelopes(1)
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "CANCELLED"]
    assert env.outcome.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert env.outcome.usage.request_messages == 0
    assert validate(env) == []


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
def test_server_streaming_handler_sees_envelope_in_generator(backend: Start) -> None:
    server = backend()
    responses = list(server.stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", count=3))))
    (env,) = server.envelopes(1)
    assert [r.run.index for r in responses] == [0, 1, 2]
    assert {r.run.envelope_id for r in responses} == {env.envelope_id}
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_EVALUATION
    assert env.execution.target.name == "m"
    assert env.outcome.usage.response_messages == 3
    assert states(env)[-1] == "COMPLETED"


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
def test_client_streaming_is_admitted_on_first_message_and_handler_gets_all(backend: Start) -> None:
    server = backend()
    chunks = [
        pb.UploadRequest(
            destination="s3-eu", declared_bytes=4096, classification="restricted", data=b"a" * 1024
        ),
        *[pb.UploadRequest(data=b"b" * 1024) for _ in range(3)],
    ]
    reply = server.stub.Upload(iter(chunks))
    (env,) = server.envelopes(1)
    assert (reply.chunks, reply.bytes, reply.envelope_id) == (4, 4096, env.envelope_id)
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_DATA_MOVEMENT
    assert (env.execution.target.type, env.execution.target.name) == ("store", "s3-eu")
    assert env.requested.bytes == 4096
    assert env.scope.data_classification == 4
    usage = env.outcome.usage
    assert (usage.request_messages, usage.request_bytes) == (4, sum(c.ByteSize() for c in chunks))
    assert validate(env) == []


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
def test_an_empty_request_stream_is_admitted_on_metadata_alone(backend: Start) -> None:
    server = backend()
    reply = server.stub.Upload(iter([]))
    (env,) = server.envelopes(1)
    assert (reply.chunks, reply.bytes, reply.envelope_id) == (0, 0, env.envelope_id)
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_DATA_MOVEMENT
    assert not env.HasField("requested")
    assert (env.outcome.usage.request_messages, env.outcome.usage.response_messages) == (0, 1)
    assert states(env) == ["RECEIVED", "NORMALIZED", "ADMITTED", "COMPLETED"]


@pytest.mark.parametrize("flavor", FLAVORS_AND_PLAIN_AIO)
def test_bidi_stream_counts_both_directions(backend: Start) -> None:
    server = backend()
    requests = [
        pb.ExchangeRequest(chunk=pb.UploadRequest(destination="s", data=bytes([i]) * 10)) for i in range(5)
    ]
    replies = list(server.stub.Exchange(iter(requests)))
    (env,) = server.envelopes(1)
    assert [r.data for r in replies] == [r.chunk.data for r in requests]
    assert env.execution.target.name == "s"
    usage = env.outcome.usage
    assert (usage.request_messages, usage.response_messages) == (5, 5)
    assert (usage.request_bytes, usage.response_bytes) == (
        sum(r.ByteSize() for r in requests),
        sum(r.ByteSize() for r in replies),
    )


def test_unmapped_method_records_transport_facts(backend: Start) -> None:
    server = backend()
    server.stub.Ping(pb.PingRequest(text="hi"))
    (env,) = server.envelopes(1)
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    assert env.execution.method == f"{SERVICE}/Ping"
    assert not env.HasField("requested")
    assert states(env)[-1] == "COMPLETED"


def test_unmapped_method_can_be_denied(backend: Start) -> None:
    server = backend(EnvelopeConfig(extractors=ExtractorRegistry(unmapped=Action.DENY)))
    assert server.stub.Run(RUN).envelope_id
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Ping(pb.PingRequest(text="hi"))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "METHOD_NOT_MAPPED"


def test_skipped_method_builds_no_envelope(backend: Start) -> None:
    registry = ExtractorRegistry(rules={f"{SERVICE}/P*": Action.SKIP})
    server = backend(EnvelopeConfig(extractors=registry))
    server.stub.Ping(pb.PingRequest(text="hi"))
    server.stub.Run(RUN)
    envelopes = server.envelopes(1)
    time.sleep(0.05)
    assert [env.execution.method for env in server.collector.envelopes] == [f"{SERVICE}/Run"]
    assert len(envelopes) == 1


def test_a_rule_set_on_a_serving_registry_applies_to_the_next_call(backend: Start) -> None:
    registry = ExtractorRegistry()
    server = backend(EnvelopeConfig(extractors=registry))
    server.stub.Ping(pb.PingRequest(text="before"))
    registry.set_rule(f"{SERVICE}/Ping", Action.DENY)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Ping(pb.PingRequest(text="after"))
    assert (caught.value.code(), error_info(caught.value).reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "METHOD_NOT_MAPPED",
    )
    registry.set_rule(f"{SERVICE}/Ping", Action.SKIP)
    server.stub.Ping(pb.PingRequest(text="skipped"))
    server.stub.Run(RUN)
    envelopes = server.envelopes(3)
    assert [env.decision.reason_code for env in envelopes] == ["", "METHOD_NOT_MAPPED", ""]
    methods = [f"{SERVICE}/Ping", f"{SERVICE}/Ping", f"{SERVICE}/Run"]  # the skipped Ping made none
    assert [env.execution.method for env in envelopes] == methods


def test_a_plan_computed_while_a_rule_changes_is_not_kept() -> None:
    registry = ExtractorRegistry()
    compute = registry._compute

    def racing(method: str) -> Any:
        plan = compute(method)
        registry.set_rule(method, Action.DENY)  # lands while the plan is being computed
        return plan

    registry._compute = racing  # type: ignore[method-assign]
    assert registry.plan(f"{SERVICE}/Ping").action is Action.RECORD
    registry._compute = compute  # type: ignore[method-assign]
    assert registry.plan(f"{SERVICE}/Ping").action is Action.DENY


def test_function_extractor_maps_a_foreign_proto(backend: Start) -> None:
    registry = ExtractorRegistry()

    def ping(request: Any) -> Extraction:
        found = Extraction(kind=ExecutionKind.EXECUTION_KIND_CONTROL)
        found.target.name = request.text
        return found

    registry.register(f"{SERVICE}/Ping", ping)
    server = backend(EnvelopeConfig(extractors=registry))
    server.stub.Ping(pb.PingRequest(text="status"))
    (env,) = server.envelopes(1)
    assert (env.execution.kind, env.execution.target.name) == (ExecutionKind.EXECUTION_KIND_CONTROL, "status")


@pytest.mark.parametrize(
    ("extract", "error"),
    [
        (lambda request: 1 / 0, "ZeroDivisionError"),
        (lambda request: Extraction(kind=99), "ValueError"),  # type: ignore[arg-type]
        (lambda request: Extraction(tenant=5), "TypeError"),  # type: ignore[arg-type]
    ],
    ids=["raises", "unknown-kind", "tenant-not-text"],
)
def test_a_failing_function_extractor_refuses_the_call(backend: Start, extract: Any, error: str) -> None:
    registry = ExtractorRegistry()
    registry.register(f"{SERVICE}/Ping", extract, kind=ExecutionKind.EXECUTION_KIND_CONTROL)
    server = backend(EnvelopeConfig(extractors=registry))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Ping(pb.PingRequest(text="status"))
    (env,) = server.envelopes(1)
    assert (caught.value.code(), error_info(caught.value).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "EXTRACTION_FAILED",
    )
    assert caught.value.details() == f"the request could not be mapped into an envelope ({error})"
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_CONTROL
    assert not env.execution.HasField("target")
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_EXTRACTION_FAILED]
    assert states(env) == ["RECEIVED", "NORMALIZED", "REJECTED"]
    assert validate(env) == []


def test_an_unexpected_error_in_admission_fails_closed(
    backend: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_admit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("admission bug")

    monkeypatch.setattr(_core, "admit", broken_admit)
    server = backend(EnvelopeConfig())
    error = refused(lambda: server.stub.Run(RUN))
    (env,) = server.envelopes(1)
    assert refusal_of(error) == (
        grpc.StatusCode.UNAVAILABLE,
        "POLICY_ERROR",
        {"envelope_id": env.envelope_id, "policy": "admission"},
    )
    assert error.details() == "admission failed (RuntimeError); the call is refused"
    assert states(env) == ["RECEIVED", "NORMALIZED", "REJECTED"]
    assert (env.decision.outcome, env.decision.deciding_policy) == (O.DECISION_OUTCOME_DENIED, "admission")
    assert validate(env) == []


TOKENS = ResourceDimension.RESOURCE_DIMENSION_TOKENS
MEMORY = ResourceDimension.RESOURCE_DIMENSION_MEMORY_BYTES
INFERENCE = ExecutionKind.EXECUTION_KIND_INFERENCE


def test_limits_policy_narrows_the_grant(backend: Start) -> None:
    server = backend(EnvelopeConfig(policies=[LimitsPolicy([Limit(TOKENS, 100, kind=INFERENCE)])]))
    _, call = server.stub.Run.with_call(RUN)
    (env,) = server.envelopes(1)
    assert env.requested.tokens == 512
    assert env.grants[0].resources.tokens == 100
    assert env.grants[0].resources.accelerator_count == 2
    decision = env.decision
    assert (decision.outcome, decision.deciding_policy, decision.reason_code) == (
        O.DECISION_OUTCOME_NARROWED,
        "limits",
        "LIMIT_NARROWED",
    )
    assert decision.message == "tokens 512 exceeds the limit of 100 for EXECUTION_KIND_INFERENCE"
    assert trailers(call)["x-execution-envelope-decision"] == "narrowed"
    assert validate(env) == []


def _comparable(env: ExecutionEnvelope) -> ExecutionEnvelope:
    """``env`` without what differs between two calls of the same request:
    ids, times, the digest and sizes."""
    copy = ExecutionEnvelope()
    copy.CopyFrom(env)
    copy.envelope_id = copy.request_id = copy.trace_id = copy.span_id = ""
    copy.execution.ClearField("request_digest")
    copy.principal.ClearField("source_address")
    for stamped in (copy.lifecycle.start_time, copy.lifecycle.end_time, copy.decision.time):
        stamped.Clear()
    for step in copy.lifecycle.transitions:
        step.ClearField("time")
    for grant in copy.grants:
        grant.ClearField("time")
    for record in copy.decision.policies:
        record.duration_us = 0
    usage = copy.outcome.usage
    usage.request_bytes = usage.response_bytes = usage.duration_ms = 0
    return copy


def test_a_call_whose_envelope_the_handler_never_reads_is_recorded_the_same(
    backend: Start, spans: InMemorySpanExporter
) -> None:
    # Such a call keeps its lifecycle and decision plain and tells its span
    # from them; the sinks get the envelope built on their own thread.
    limits = LimitsPolicy([Limit(TOKENS, 100, kind=INFERENCE)])
    server = backend(
        EnvelopeConfig(policies=[PolicySpec(limits), PolicySpec(limits, name="audit", dry_run=True)])
    )
    for behavior in ("blind", "ok"):
        request = pb.RunRequest()
        request.CopyFrom(RUN)
        request.behavior = behavior
        server.stub.Run(request)
    blind, read = server.envelopes(2)
    assert _comparable(blind) == _comparable(read)
    assert validate(blind) == []
    assert blind.decision.outcome == O.DECISION_OUTCOME_NARROWED
    assert states(blind) == ["RECEIVED", "NORMALIZED", "ADMITTED", "COMPLETED"]
    attributes = []
    for span, env in (
        (server_span(spans, f"{SERVICE}/Run", 1), blind),
        (server_span(spans, f"{SERVICE}/Run", 2), read),
    ):
        found = dict(span.attributes or {})
        assert found.pop("execution_envelope.id") == env.envelope_id
        assert found.pop("execution_envelope.request_id") == env.request_id
        offsets = [step.partition(":") for step in str(found.pop("execution_envelope.lifecycle")).split()]
        assert [state for state, _, _ in offsets] == ["received", "normalized", "admitted", "completed"]
        attributes.append(
            {key: value for key, value in found.items() if key.startswith("execution_envelope.")}
        )
        assert [(event.name, dict(event.attributes or {})) for event in span.events] == [
            ("execution_envelope.admitted", {"actor": "admission", "reason": "LIMIT_NARROWED"})
        ]
    assert attributes[0] == attributes[1]
    assert attributes[0]["execution_envelope.granted.tokens"] == 100
    assert attributes[0]["execution_envelope.decision.mode"] == "enforce"


def test_an_envelope_that_cannot_be_built_is_left_unwritten(monkeypatch: pytest.MonkeyPatch) -> None:
    env = blank_envelope("/a.B/C")
    call = Call(env, trace.INVALID_SPAN, time.time_ns())
    call.step(model.NORMALIZED, "extractor")
    call.admission = admit(env, (), fail_open=False)

    def broken(self: Admission, decision: Any) -> None:
        decision.mode = EnforcementMode.ENFORCEMENT_MODE_ENFORCE
        raise RuntimeError("cannot write")

    monkeypatch.setattr(Admission, "write", broken)
    with pytest.raises(RuntimeError, match="cannot write"):
        call.envelope()
    assert (call.materialized, env.HasField("lifecycle"), env.HasField("decision")) == (False, False, False)
    monkeypatch.undo()
    call.step(model.ADMITTED, "admission")
    call.end(grpc.StatusCode.OK, "")
    built = call.envelope()
    assert states(built) == ["RECEIVED", "NORMALIZED", "ADMITTED", "COMPLETED"]
    assert validate(built) == []


def test_steps_after_the_envelope_is_built_go_straight_into_it() -> None:
    env = blank_envelope("/a.B/C")
    call = Call(env, trace.INVALID_SPAN, time.time_ns())
    built = call.envelope()
    assert states(built) == ["RECEIVED"]
    call.step(model.NORMALIZED, "extractor", "CHECKED")
    assert states(built) == ["RECEIVED", "NORMALIZED"]
    assert built.lifecycle.transitions[-1].reason == "CHECKED"
    with pytest.raises(RuntimeError, match="neither refused nor ended"):
        Call(blank_envelope("/a.B/C"), trace.INVALID_SPAN, time.time_ns()).progress()


def test_limits_policy_denies_with_status_and_error_info(backend: Start, spans: InMemorySpanExporter) -> None:
    server = backend(EnvelopeConfig(policies=[LimitsPolicy([Limit(TOKENS, 100, deny=True)])]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert (info.reason, info.domain) == ("LIMIT_EXCEEDED", "envelope-grpc")
    assert dict(info.metadata) == {"envelope_id": env.envelope_id, "policy": "limits"}
    metadata = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert metadata["x-execution-envelope-id"] == env.envelope_id
    assert metadata["x-execution-envelope-decision"] == "denied"
    assert states(env) == ["RECEIVED", "NORMALIZED", "REJECTED"]
    assert env.decision.outcome == O.DECISION_OUTCOME_DENIED
    assert len(env.grants) == 0
    assert validate(env) == []
    span = server_span(spans, f"{SERVICE}/Run")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["execution_envelope.state"] == "rejected"


def test_a_failing_metrics_recorder_changes_no_decision(backend: Start) -> None:
    server = backend(EnvelopeConfig(policies=[LimitsPolicy([Limit(TOKENS, 100, deny=True)])]))

    def record(*counted: Any) -> None:
        raise RuntimeError("the meter is down")

    server.interceptor.core.metrics.record = record
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    server.stub.Run(pb.RunRequest(model="m", max_tokens=10))
    refused, admitted = server.envelopes(2)
    assert (caught.value.code(), error_info(caught.value).reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "LIMIT_EXCEEDED",
    )
    assert states(refused) == ["RECEIVED", "NORMALIZED", "REJECTED"]
    assert states(admitted) == ["RECEIVED", "NORMALIZED", "ADMITTED", "COMPLETED"]


def broken(envelope: ExecutionEnvelope, /) -> Allow:
    raise RuntimeError("policy store unreachable")


def test_raising_policy_fails_closed(backend: Start) -> None:
    server = backend(EnvelopeConfig(policies=[broken]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "POLICY_ERROR"
    assert env.decision.policies[0].error == "RuntimeError: policy store unreachable"
    assert not env.decision.fail_open
    assert states(env)[-1] == "REJECTED"


def test_raising_policy_fails_open_when_configured(backend: Start) -> None:
    server = backend(EnvelopeConfig(policies=[broken], fail_open=True))
    server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert env.decision.fail_open
    assert env.decision.policies[0].fail_open
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_FAIL_OPEN]
    assert states(env)[-1] == "COMPLETED"


def test_dry_run_policy_records_the_deny_it_would_make(backend: Start) -> None:
    def deny_all(envelope: ExecutionEnvelope, /) -> Deny:
        return Deny(grpc.StatusCode.PERMISSION_DENIED, "NOT_ALLOWED", "nobody may run models")

    server = backend(EnvelopeConfig(policies=[PolicySpec(deny_all, dry_run=True)]))
    server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    verdict = env.decision.policies[0]
    assert (verdict.policy, verdict.mode, verdict.outcome, verdict.reason_code) == (
        "deny_all",
        EnforcementMode.ENFORCEMENT_MODE_DRY_RUN,
        O.DECISION_OUTCOME_DENIED,
        "NOT_ALLOWED",
    )
    assert env.decision.outcome == O.DECISION_OUTCOME_ADMITTED
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_DRY_RUN_DENY]
    assert states(env)[-1] == "COMPLETED"


def test_works_without_opentelemetry_interceptor(backend: Start) -> None:
    server = backend(traced=False)
    server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert (env.trace_id, env.span_id) == ("", "")
    assert validate(env) == []


def trusted(peer: Any) -> bool:
    return bool(peer.address.startswith("ipv4:127.0.0.1:"))


def test_chained_servers_give_one_trace_and_lineage(backend: Start, spans: InMemorySpanExporter) -> None:
    downstream = backend(EnvelopeConfig(trust_peer=trusted))
    upstream = backend(downstream=lambda: downstream.address)
    reply = upstream.stub.Run(pb.RunRequest(model="agent", behavior="downstream"))
    (parent,) = upstream.envelopes(1)
    (child,) = downstream.envelopes(1)
    assert reply.parent_envelope_id == parent.envelope_id
    assert (child.lineage.parent_envelope_id, child.lineage.root_envelope_id, child.lineage.depth) == (
        parent.envelope_id,
        parent.envelope_id,
        1,
    )
    assert child.trace_id == parent.trace_id != ""
    assert list(child.flags) == []
    assert validate(child) == []
    child_span = server_span(spans, f"{SERVICE}/Run", count=1)
    assert (child_span.attributes or {})["execution_envelope.parent_id"] == parent.envelope_id


@pytest.mark.parametrize("flavor", ["aio-sync"])
def test_plain_handlers_on_a_grpc_aio_server(backend: Start, spans: InMemorySpanExporter) -> None:
    # grpc.aio runs plain functions and generators on its thread pool: the
    # handler API works there, and their responses are counted.
    server = backend(EnvelopeConfig(policies=[LimitsPolicy([Limit(TOKENS, 100, kind=INFERENCE)])]))
    bound = pb.RunRequest()
    bound.CopyFrom(RUN)
    bound.behavior = "bind"
    reply = server.stub.Run(bound)
    watched = list(server.stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", count=3))))
    run, watch = server.envelopes(2)
    assert reply.envelope_id == run.envelope_id
    assert transitions(run) == COMPLETED_PATH
    assert run.binding.node == "node-a"
    assert run.grants[0].resources.tokens == 100
    assert [w.run.envelope_id for w in watched] == [watch.envelope_id] * 3
    assert (watch.outcome.usage.response_messages, watch.lifecycle.state) == (3, model.COMPLETED)
    assert validate(run) == validate(watch) == []
    span = server_span(spans, f"{SERVICE}/Run")
    assert (span.attributes or {})["execution_envelope.binding.node"] == "node-a"


_STATE: contextvars.ContextVar[str] = contextvars.ContextVar("handler_state", default="")


class PlainStreams(pb_grpc.ExecutionTestServiceServicer):
    """Plain handlers that record what they see."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def Watch(self, request: pb.WatchRequest, context: Any) -> Iterator[pb.WatchResponse]:
        _STATE.set("set before the first response")
        with trace.get_tracer("test").start_as_current_span("inner") as inner:
            for index in range(3):
                self.seen.append((_STATE.get(), trace.get_current_span() is inner))
                yield pb.WatchResponse(run=pb.RunResponse(index=index))

    def Upload(self, request_iterator: Iterator[pb.UploadRequest], context: Any) -> pb.UploadResponse:
        try:
            for chunk in request_iterator:
                self.seen.append(len(chunk.data))
        except grpc.RpcError:
            self.seen.append("RpcError")
            raise
        self.seen.append("ended")
        return pb.UploadResponse()

    def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:
        context.send_initial_metadata((("x-initial", request.text),))
        return pb.PingResponse(text=request.text)


@pytest.mark.parametrize("flavor", ["grpc", "aio-sync"])
def test_a_plain_generator_keeps_its_context_from_response_to_response(backend: Start) -> None:
    handler = PlainStreams()
    server = backend(servicer=handler)
    assert len(list(server.stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", count=3))))) == 3
    assert handler.seen == [("set before the first response", True)] * 3


@pytest.mark.parametrize("flavor", ["grpc", "aio-sync"])
def test_a_plain_handler_sends_initial_metadata(backend: Start) -> None:
    server = backend(servicer=PlainStreams())
    reply, call = server.stub.Ping.with_call(pb.PingRequest(text="hello"))
    assert reply.text == "hello"
    assert dict(call.initial_metadata())["x-initial"] == "hello"  # type: ignore[attr-defined]


@pytest.mark.parametrize("flavor", ["grpc", "aio-sync"])
def test_a_plain_request_stream_cut_short_raises_rpc_error(backend: Start, flavor: str) -> None:
    handler = PlainStreams()
    server = backend(servicer=handler)

    def slow() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(destination="s3-eu", data=b"x")
        time.sleep(1.0)
        yield pb.UploadRequest(data=b"y")

    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Upload(slow(), timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    (env,) = server.envelopes(1)
    assert states(env)[-1] == "CANCELLED"
    assert env.outcome.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    if flavor == "aio-sync":  # a grpc server's own iterator may also just end, when the deadline races it
        wait_until(lambda: handler.seen == [1, "RpcError"])


def test_client_interceptors_carry_the_envelope_on_every_arity(backend: Start) -> None:
    downstream = backend(EnvelopeConfig(trust_peer=trusted))
    parent = blank_envelope("/upstream.v1.Agents/Run")
    parent.lineage.root_envelope_id = "a" * 32
    parent.lineage.depth = 2
    token = _core.CURRENT.set(Call(parent, trace.INVALID_SPAN, time.time_ns()))
    try:
        with grpc.insecure_channel(downstream.address) as plain:
            stub = pb_grpc.ExecutionTestServiceStub(
                grpc.intercept_channel(plain, envelope_grpc.EnvelopeClientInterceptor())
            )
            upload = pb.UploadRequest(destination="store-a", data=b"x")
            stub.Run(pb.RunRequest(model="m"))
            list(stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", count=1))))
            stub.Upload(iter([upload]))
            list(stub.Exchange(iter([pb.ExchangeRequest(chunk=upload)])))

        async def over_aio() -> None:
            async with grpc.aio.insecure_channel(
                downstream.address, interceptors=envelope_grpc.aio.client_interceptors()
            ) as channel:
                stub = pb_grpc.ExecutionTestServiceStub(channel)
                await stub.Run(pb.RunRequest(model="m"))
                [_ async for _ in stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", count=1)))]
                upload = pb.UploadRequest(destination="store-a", data=b"x")
                await stub.Upload(iter([upload]))
                [_ async for _ in stub.Exchange(iter([pb.ExchangeRequest(chunk=upload)]))]

        asyncio.run(over_aio())
    finally:
        _core.CURRENT.reset(token)
    found = downstream.envelopes(8)
    assert len(found) == 8
    assert [list(env.flags) for env in found] == [[]] * 8
    assert {
        (env.lineage.parent_envelope_id, env.lineage.root_envelope_id, env.lineage.depth) for env in found
    } == {(parent.envelope_id, "a" * 32, 3)}
    assert sorted(env.execution.method.rsplit("/", 1)[1] for env in found) == sorted(
        ["Run", "Watch", "Upload", "Exchange"] * 2
    )


def test_client_interceptors_leave_calls_outside_an_intercepted_call_alone(backend: Start) -> None:
    downstream = backend(EnvelopeConfig(trust_peer=trusted))

    async def over_aio() -> None:
        async with grpc.aio.insecure_channel(
            downstream.address, interceptors=envelope_grpc.aio.client_interceptors()
        ) as channel:
            await pb_grpc.ExecutionTestServiceStub(channel).Run(pb.RunRequest(model="m"))

    asyncio.run(over_aio())
    with grpc.insecure_channel(downstream.address) as plain:
        stub = pb_grpc.ExecutionTestServiceStub(
            grpc.intercept_channel(plain, envelope_grpc.EnvelopeClientInterceptor())
        )
        stub.Run(pb.RunRequest(model="m"))
    found = downstream.envelopes(2)
    assert [(env.lineage.parent_envelope_id, list(env.flags)) for env in found] == [("", []), ("", [])]


def test_peer_envelope_from_untrusted_peer_is_ignored_and_flagged(
    backend: Start, spans: InMemorySpanExporter
) -> None:
    downstream = backend()
    upstream = backend(downstream=lambda: downstream.address)
    upstream.stub.Run(pb.RunRequest(model="agent", behavior="downstream"))
    (child,) = downstream.envelopes(1)
    assert child.lineage.parent_envelope_id == ""
    assert list(child.flags) == [EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_UNTRUSTED]
    assert states(child)[-1] == "COMPLETED"
    span = server_span(spans, f"{SERVICE}/Run", count=1)
    assert (span.attributes or {})["execution_envelope.flags"] == ("peer_envelope_untrusted",)


@pytest.mark.parametrize(
    ("header", "flag"),
    [
        (b"\xff\xff\xff", EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_MALFORMED),
        (
            EnvelopeContext(envelope_id="not-hex").SerializeToString(),
            EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_MALFORMED,
        ),
        (
            EnvelopeContext(envelope_id="a" * 32, depth=64).SerializeToString(),
            EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_MALFORMED,
        ),
        (b"\x0a" * 600, EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_OVERSIZED),
    ],
)
def test_bad_peer_envelope_is_ignored_and_flagged(backend: Start, header: bytes, flag: int) -> None:
    server = backend(EnvelopeConfig(trust_peer=trusted))
    server.stub.Run(RUN, metadata=(("x-execution-envelope-bin", header),))
    (env,) = server.envelopes(1)
    assert env.lineage.parent_envelope_id == ""
    assert list(env.flags) == [flag]
    assert states(env)[-1] == "COMPLETED"


def test_peer_envelope_never_widens_the_grant(backend: Start) -> None:
    parent = EnvelopeContext(envelope_id="b" * 32, kind=ExecutionKind.EXECUTION_KIND_AGENT_WORKFLOW)
    server = backend(EnvelopeConfig(trust_peer=trusted, policies=[LimitsPolicy([Limit(TOKENS, 100)])]))
    server.stub.Run(RUN, metadata=(("x-execution-envelope-bin", parent.SerializeToString()),))
    (env,) = server.envelopes(1)
    assert env.lineage.parent_envelope_id == "b" * 32
    assert env.grants[0].resources.tokens == 100
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_INFERENCE


def test_policy_over_its_budget_fails_closed(backend: Start) -> None:
    def slow(envelope: ExecutionEnvelope, /) -> Allow:
        time.sleep(0.5)
        return Allow()

    server = backend(EnvelopeConfig(policies=[PolicySpec(slow, budget=0.05)]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert env.decision.policies[0].error == "TimeoutError: no verdict within its budget of 50 ms"


class Counting:
    """A releasing policy: takes at admission, gives back when the call ends."""

    name = "counting"

    def __init__(self) -> None:
        self.taken: list[str] = []
        self.released: list[str] = []

    def __call__(self, envelope: ExecutionEnvelope, /) -> Allow:
        self.taken.append(envelope.envelope_id)
        return Allow()

    def release(self, envelope: ExecutionEnvelope, /) -> None:
        self.released.append(envelope.envelope_id)


class Held:
    """A releasing policy that holds something only once its verdict is in:
    release gives back what it holds, and nothing before."""

    name = "held"

    def __init__(self) -> None:
        self.proceed = threading.Event()
        self.holding: set[str] = set()
        self.given_back: list[str] = []

    def __call__(self, envelope: ExecutionEnvelope, /) -> Allow:
        self.proceed.wait(5)
        self.holding.add(envelope.envelope_id)
        return Allow()

    def release(self, envelope: ExecutionEnvelope, /) -> None:
        if envelope.envelope_id in self.holding:
            self.holding.remove(envelope.envelope_id)
            self.given_back.append(envelope.envelope_id)


def test_a_releasing_policy_that_answers_after_its_budget_is_released_when_it_does(
    backend: Start,
) -> None:
    held = Held()
    server = backend(EnvelopeConfig(policies=[PolicySpec(held, budget=0.05)]))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert held.given_back == []  # the call was released before the policy took anything
    held.proceed.set()
    wait_until(lambda: held.given_back == [env.envelope_id])
    assert held.holding == set()


def test_a_late_releasing_policy_that_fails_open_is_released_when_its_call_ends(backend: Start) -> None:
    held = Held()
    server = backend(EnvelopeConfig(policies=[PolicySpec(held, budget=0.05, fail_open=True)]))
    call = server.stub.Run.future(pb.RunRequest(model="m", behavior="sleep"))  # runs for 0.5 s
    time.sleep(0.15)  # past the budget: the call went on
    held.proceed.set()
    wait_until(lambda: len(held.holding) == 1)
    time.sleep(0.1)
    assert held.given_back == []  # not while the call runs
    call.result(timeout=5)
    (env,) = server.envelopes(1)
    assert env.decision.fail_open
    wait_until(lambda: held.given_back == [env.envelope_id])


def test_releasing_policy_gives_back_when_the_call_ends(backend: Start) -> None:
    counting = Counting()
    limits = LimitsPolicy([Limit(TOKENS, 100, deny=True)])
    server = backend(EnvelopeConfig(policies=[PolicySpec(counting, blocking=True), limits]))
    server.stub.Run(pb.RunRequest(model="m"))
    with pytest.raises(grpc.RpcError):
        server.stub.Run(pb.RunRequest(model="m", max_tokens=1000))
    with pytest.raises(grpc.RpcError):
        server.stub.Run(pb.RunRequest(model="m", behavior="fail"))
    envelopes = server.envelopes(3)
    assert sorted(counting.released) == sorted(counting.taken) == sorted(env.envelope_id for env in envelopes)


def test_negative_resource_request_is_invalid_argument(backend: Start) -> None:
    server = backend()
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(pb.RunRequest(model="m", max_tokens=-5, accelerators=pb.Accelerators(count=1)))
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_RESOURCE"
    assert env.decision.message == "requested tokens must not be negative"
    assert not env.requested.HasField("tokens")
    assert env.requested.accelerator_count == 1
    assert validate(env) == []


def test_overlong_request_values_are_cut_to_the_contract(backend: Start) -> None:
    server = backend()
    server.stub.Run(pb.RunRequest(model="m" * 300, engine="e" * 600, region="r" * 100))
    (env,) = server.envelopes(1)
    assert env.execution.target.name == "m" * 256
    assert env.execution.target.attributes["engine"] == "e" * 512
    assert env.scope.region == "r" * 64
    assert validate(env) == []


def test_blocking_policies_do_not_serialize_calls(backend: Start) -> None:
    # In grpc.aio a blocking policy runs off the event loop: two calls meet in
    # their admission (a barrier both must reach), as on a grpc server; were
    # admissions serialized, the barrier would break and both calls fail.
    barrier = threading.Barrier(2, timeout=5)

    def meet(envelope: ExecutionEnvelope, /) -> Allow:
        barrier.wait()
        return Allow()

    server = backend(EnvelopeConfig(policies=[PolicySpec(meet, blocking=True)]))
    futures = [server.stub.Run.future(RUN) for _ in range(2)]
    replies = [future.result() for future in futures]
    envelopes = server.envelopes(2)
    assert {reply.envelope_id for reply in replies} == {env.envelope_id for env in envelopes}
    assert [env.decision.policies[0].error for env in envelopes] == ["", ""]


def test_request_value_out_of_range_is_refused_not_admitted_blind(backend: Start) -> None:
    limits = LimitsPolicy([Limit(ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT, 16, deny=True)])
    server = backend(EnvelopeConfig(policies=[limits]))
    request = pb.RunRequest(model="m", accelerators=pb.Accelerators(count=64, memory_gib=2**40))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(request)
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "EXTRACTION_FAILED"
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_EXTRACTION_FAILED]
    assert states(env) == ["RECEIVED", "NORMALIZED", "REJECTED"]
    assert validate(env) == []


@pytest.mark.parametrize(
    ("verdict", "error"),
    [
        (None, "TypeError: a policy returned NoneType, not Allow, Narrow or Deny"),
        (
            Narrow(Resources(tokens=1), "", ""),
            "ValueError: a Narrow needs a reason code like LIMIT_EXCEEDED and a message",
        ),
        (Deny(grpc.StatusCode.OK, "NOPE", "no"), "ValueError: a Deny cannot carry status OK"),
        (
            Allow(rule_ids=("r1", 2)),  # type: ignore[arg-type]
            "TypeError: a verdict's message and rule ids are text, not int",
        ),
        (
            Narrow(Resources(tokens=1), "CAPPED", "half a \ud800 surrogate"),
            "UnicodeEncodeError: 'utf-8' codec can't encode character '\\ud800' in position 7: "
            "surrogates not allowed",
        ),
        (
            Narrow({"tokens": 1}, "CAPPED", "at most one token"),  # type: ignore[arg-type]
            "TypeError: a Narrow's caps are Resources, not dict",
        ),
        (
            Narrow(Usage(duration_ms=1), "CAPPED", "a usage is no cap"),  # type: ignore[arg-type]
            "TypeError: a Narrow's caps are Resources, not Usage",
        ),
    ],
    ids=[
        "none",
        "narrow-without-reason",
        "deny-ok",
        "rule-id-not-text",
        "message-not-utf8",
        "caps-a-dict",
        "caps-not-resources",
    ],
)
def test_malformed_verdict_fails_closed_and_releases(backend: Start, verdict: Any, error: str) -> None:
    counting = Counting()
    server = backend(
        EnvelopeConfig(policies=[counting, PolicySpec(lambda envelope, /: verdict, name="sloppy")])
    )
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "POLICY_ERROR"
    assert env.decision.policies[1].error == error
    assert counting.released == [env.envelope_id]
    assert validate(env) == []


def test_policy_error_text_masks_credentials(backend: Start) -> None:
    def store(envelope: ExecutionEnvelope, /) -> Allow:
        raise ConnectionError("cannot reach redis://quota:hunter2@10.0.0.7:6379/0")

    server = backend(EnvelopeConfig(policies=[store]))
    with pytest.raises(grpc.RpcError):
        server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert env.decision.policies[0].error == "ConnectionError: cannot reach redis://***@10.0.0.7:6379/0"
    assert "hunter2" not in to_json(env)


def test_failing_trust_predicate_trusts_nobody(backend: Start) -> None:
    def broken(peer: Any) -> bool:
        raise RuntimeError("directory down")

    parent = EnvelopeContext(envelope_id="c" * 32)
    server = backend(EnvelopeConfig(trust_peer=broken))
    server.stub.Run(RUN, metadata=(("x-execution-envelope-bin", parent.SerializeToString()),))
    (env,) = server.envelopes(1)
    assert env.lineage.parent_envelope_id == ""
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_UNTRUSTED]


def test_call_cancelled_during_blocking_admission_still_ends_and_releases(backend: Start) -> None:
    counting = Counting()
    started, proceed = threading.Event(), threading.Event()

    def slow(envelope: ExecutionEnvelope, /) -> Allow:
        started.set()
        proceed.wait(5)
        return Allow()

    policies = [PolicySpec(counting, blocking=True), PolicySpec(slow, blocking=True)]
    server = backend(EnvelopeConfig(policies=policies))
    call = server.stub.Run.future(RUN)
    assert started.wait(5)
    call.cancel()
    time.sleep(0.2)  # let the server see the cancellation before admission finishes
    proceed.set()
    (env,) = server.envelopes(1)
    assert call.cancelled()
    assert states(env)[-1] == "CANCELLED"
    assert counting.released == [env.envelope_id]
    assert validate(env) == []


def _pool_with(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pool.DescriptorPool:
    """A pool holding ``file`` and the files it imports, copied from the default pool."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        found = descriptor_pool.Default().FindFileByName(name)
        for dependency in found.dependencies:
            add(dependency.name)
        proto = descriptor_pb2.FileDescriptorProto()
        found.CopyToProto(proto)
        pool.Add(proto)
        added.add(name)

    for dependency in file.dependency:
        add(dependency)
    pool.Add(file)
    return pool


_F = descriptor_pb2.FieldDescriptorProto


def _request_type(fields: Any, nested: Any = ()) -> tuple[Any, ExtractorRegistry]:
    """A request type built at run time from (name, type, label, rule) fields
    (and a nested "Shard" type), its message class, and a registry over it."""
    file = descriptor_pb2.FileDescriptorProto(
        name="shapes/v1/shapes.proto",
        package="shapes.v1",
        syntax="proto3",
        dependency=["envelope_grpc/v1/options.proto"],
    )
    for type_name, type_fields in (("Shard", nested), ("Request", fields)):
        message = file.message_type.add(name=type_name)
        for number, (name, kind, label, rule) in enumerate(type_fields, start=1):
            field = message.field.add(name=name, number=number, type=kind, label=label)
            if kind == _F.TYPE_MESSAGE:
                field.type_name = ".shapes.v1.Shard"
            if rule is not None:
                field.options.Extensions[options_pb2.field].CopyFrom(rule)
    method = file.service.add(name="Models").method.add(
        name="Run", input_type=".shapes.v1.Request", output_type=".shapes.v1.Request"
    )
    method.options.Extensions[options_pb2.method].kind = INFERENCE
    pool = _pool_with(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("shapes.v1.Request")
    ), ExtractorRegistry(pool=pool)


def test_declared_fields_of_every_shape_are_extracted() -> None:
    # Names like Python keywords, repeated values (listed or summed), a
    # fractional amount, and a repeated nested message.
    one, many = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    request_type, registry = _request_type(
        [
            ("from", _F.TYPE_STRING, one, FieldRule(target=TargetField.TARGET_FIELD_NAME)),
            ("lambda", _F.TYPE_INT64, one, FieldRule(resource=TOKENS)),
            ("class", _F.TYPE_STRING, one, FieldRule(hint="class")),
            ("datasets", _F.TYPE_STRING, many, FieldRule(scope=ScopeField.SCOPE_FIELD_DATASET)),
            ("gib", _F.TYPE_DOUBLE, one, FieldRule(resource=MEMORY, scale=1 << 30)),
            ("shards", _F.TYPE_MESSAGE, many, None),
        ],
        nested=[("tokens", _F.TYPE_INT64, many, FieldRule(resource=TOKENS))],
    )
    plan = registry.plan("/shapes.v1.Models/Run")
    assert plan.extractor is not None
    found = plan.extractor(
        request_type(
            **{
                "from": "model-a",
                "lambda": 7,
                "class": "gold",
                "datasets": ["d1", "d2"],
                "gib": 1.5,
                "shards": [{"tokens": [1, 2]}, {"tokens": [3]}],
            }
        )
    )
    assert (
        found.kind,
        found.target.name,
        found.requested,
        dict(found.scope.hints),
        list(found.scope.datasets),
    ) == (
        INFERENCE,
        "model-a",
        Resources(tokens=13, memory_bytes=3 << 29),
        {"class": "gold"},
        ["d1", "d2"],
    )
    with pytest.raises(ValueError, match="memory_bytes is out of range"):
        plan.extractor(request_type(gib=1e300))
