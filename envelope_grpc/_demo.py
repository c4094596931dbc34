"""`envelope-grpc demo`: a real server with the envelope interceptors, driven
by a scripted mix of calls, printing the envelopes it produced.

It serves the annotated testing service on 127.0.0.1 with OpenTelemetry and
the envelope interceptors, a limits policy and a JSON-lines audit sink; spans
go to any OTLP backend when OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import IO

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import envelope_grpc
from envelope_grpc import EnvelopeConfig, Limit, LimitsPolicy
from envelope_grpc._telemetry import KIND_NAMES, OUTCOME_NAMES, STATE_NAMES
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc
from envelope_grpc.v1.envelope_pb2 import (
    Binding,
    ExecutionEnvelope,
    ExecutionKind,
    ResourceDimension,
    Resources,
    Usage,
)

GIB = 1 << 30
FREE_ACCELERATORS = 8


class DemoServicer(pb_grpc.ExecutionTestServiceServicer):
    """A tiny backend: grants what fits on one 8-accelerator node, sizes
    memory itself, and calls itself downstream for an "agent" model."""

    def __init__(self, address: list[str], tracer_provider: TracerProvider) -> None:
        self.address = address
        self.tracer_provider = tracer_provider

    def Run(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunResponse:
        env = envelope_grpc.current_envelope()
        assert env is not None
        if request.model == "agent":
            return self._fan_out(env, request)
        asked = env.grants[0].resources
        if asked.accelerator_count > FREE_ACCELERATORS:
            context.abort_with_status(
                envelope_grpc.reject(
                    "INSUFFICIENT_CAPACITY",
                    f"{asked.accelerator_count} accelerators asked, {FREE_ACCELERATORS} free",
                )
            )
        if asked.HasField("accelerator_count"):
            granted = Resources()
            granted.CopyFrom(asked)
            granted.memory_bytes = 16 * GIB * max(asked.accelerator_count, 1)
            envelope_grpc.record_grant(
                granted, reason_code="MEMORY_SIZED", reason="host memory sized by the backend"
            )
            indexes = list(range(asked.accelerator_count))
            envelope_grpc.record_binding(
                Binding(node="node-a", accelerator_indexes=indexes, endpoint="10.0.0.5:8001")
            )
        return pb.RunResponse(envelope_id=env.envelope_id)

    def _fan_out(self, env: ExecutionEnvelope, request: pb.RunRequest) -> pb.RunResponse:
        with grpc.insecure_channel(self.address[0]) as channel:
            tracer = client_interceptor(tracer_provider=self.tracer_provider)  # type: ignore[no-untyped-call]
            traced = intercept_channel(channel, tracer)  # type: ignore[no-untyped-call]
            stub = pb_grpc.ExecutionTestServiceStub(
                grpc.intercept_channel(traced, envelope_grpc.EnvelopeClientInterceptor())
            )
            for step in ("plan", "act"):
                stub.Run(pb.RunRequest(model=f"llm-{step}", tenant=request.tenant, max_tokens=256))
        return pb.RunResponse(envelope_id=env.envelope_id)

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        for index in range(request.run.count):
            yield pb.WatchResponse(run=pb.RunResponse(index=index))

    def Upload(
        self, request_iterator: Iterator[pb.UploadRequest], context: grpc.ServicerContext
    ) -> pb.UploadResponse:
        chunks = size = 0
        for chunk in request_iterator:
            chunks += 1
            size += len(chunk.data)
        envelope_grpc.record_usage(Usage(bytes_moved=size))
        return pb.UploadResponse(chunks=chunks, bytes=size)

    def Exchange(
        self, request_iterator: Iterator[pb.ExchangeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExchangeResponse]:
        for request in request_iterator:
            yield pb.ExchangeResponse(data=request.chunk.data)

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse(text=request.text)


def _traffic(stub: pb_grpc.ExecutionTestServiceStub) -> None:
    def call(method: str, request: object, tenant: str = "") -> None:
        metadata = (("x-request-id", f"demo-{method.lower()}-{tenant or 'anon'}"),)
        try:
            result = getattr(stub, method)(request, metadata=metadata)
            if method == "Watch":
                list(result)
        except grpc.RpcError:
            pass  # refusals are part of the demo; their envelopes tell why

    call("Run", pb.RunRequest(model="llama-3-8b", tenant="acme", max_tokens=512), "acme")
    call(
        "Run",
        pb.RunRequest(model="llama-3-70b", tenant="acme", accelerators=pb.Accelerators(count=4)),
        "acme",
    )
    call("Run", pb.RunRequest(model="llama-3-8b", tenant="globex", max_tokens=20000), "globex")
    call(
        "Run",
        pb.RunRequest(model="mixtral", tenant="globex", accelerators=pb.Accelerators(count=12)),
        "globex",
    )
    call(
        "Run",
        pb.RunRequest(model="llama-3-405b", tenant="initech", accelerators=pb.Accelerators(count=64)),
        "initech",
    )
    call("Watch", pb.WatchRequest(run=pb.RunRequest(model="eval-suite", tenant="acme", count=5)), "acme")
    chunks = iter(
        [pb.UploadRequest(destination="lake-eu", declared_bytes=3 << 20, data=b"x" * (1 << 20))]
        + [pb.UploadRequest(data=b"x" * (1 << 20)) for _ in range(2)]
    )
    call("Upload", chunks, "")
    call("Run", pb.RunRequest(model="agent", tenant="acme"), "acme")
    call("Ping", pb.PingRequest(text="hello"))


def _row(env: ExecutionEnvelope) -> list[str]:
    requested = env.requested
    granted = env.grants[-1].resources if env.grants else None

    def amounts(resources: Resources | None) -> str:
        if resources is None:
            return "-"
        parts = [f"acc={resources.accelerator_count}"] if resources.HasField("accelerator_count") else []
        if resources.HasField("tokens"):
            parts.append(f"tok={resources.tokens}")
        if resources.HasField("memory_bytes"):
            parts.append(f"mem={resources.memory_bytes // GIB}G")
        if resources.HasField("bytes"):
            parts.append(f"bytes={resources.bytes}")
        return " ".join(parts) or "-"

    decision = OUTCOME_NAMES[env.decision.outcome]
    if env.decision.reason_code:
        decision += f" ({env.decision.reason_code})"
    state = STATE_NAMES[env.lifecycle.state]
    if env.outcome.reason_code and env.outcome.reason_code != env.decision.reason_code:
        state += f" ({env.outcome.reason_code})"
    parent = env.lineage.parent_envelope_id[:8] or "-"
    return [
        env.envelope_id[:8],
        parent,
        env.principal.tenant or "-",
        KIND_NAMES[env.execution.kind],
        env.execution.target.name or env.execution.method.rsplit("/", 1)[-1],
        amounts(requested),
        amounts(granted),
        decision,
        state,
    ]


def table(envelopes: list[ExecutionEnvelope], out: IO[str]) -> None:
    """Print envelopes as an aligned table."""
    header = ["envelope", "parent", "tenant", "kind", "target", "requested", "granted", "decision", "state"]
    rows = [header, *(_row(env) for env in envelopes)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )
        if index == 0:
            out.write("  ".join("-" * width for width in widths) + "\n")


class _Collect:
    def __init__(self) -> None:
        self.envelopes: list[ExecutionEnvelope] = []

    def write(self, envelopes: Sequence[ExecutionEnvelope], /) -> None:
        self.envelopes.extend(envelopes)

    def close(self) -> None:
        pass


def run(audit_path: str, out: IO[str] = sys.stdout) -> int:
    """Start the server, drive the traffic, print the table; returns an exit status."""
    provider = TracerProvider(resource=Resource.create({"service.name": "envelope-grpc-demo"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    collected = _Collect()
    limits = LimitsPolicy(
        [
            Limit(
                ResourceDimension.RESOURCE_DIMENSION_TOKENS, 4096, kind=ExecutionKind.EXECUTION_KIND_INFERENCE
            ),
            Limit(ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT, 16, deny=True),
        ]
    )
    config = EnvelopeConfig(
        policies=[limits],
        sinks=[envelope_grpc.JsonLinesSink(audit_path), collected],
        trust_peer=lambda peer: peer.address.startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:")),
    )
    interceptors = envelope_grpc.server_interceptors(config, tracer_provider=provider)
    address: list[str] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    pb_grpc.add_ExecutionTestServiceServicer_to_server(DemoServicer(address, provider), server)
    address.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
    server.start()
    try:
        with grpc.insecure_channel(address[0]) as channel:
            _traffic(pb_grpc.ExecutionTestServiceStub(channel))
    finally:
        server.stop(None).wait()
        envelope = interceptors[-1]
        assert isinstance(envelope, envelope_grpc.EnvelopeServerInterceptor)
        envelope.close()
        provider.shutdown()
    table(collected.envelopes, out)
    out.write(f"\n{len(collected.envelopes)} envelopes written to {audit_path}\n")
    return 0
