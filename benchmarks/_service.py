"""What the benchmark serves and how: servicers, span exporter, configurations.

Imported by the server processes and, for the request builders, by the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Final

import grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from envelope_grpc._constants import ATTR_ID, ENVELOPE_ID_METADATA
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc

FLAVOURS: Final = ("grpc", "grpc.aio")
#: Server configurations, in the order they are reported.
CONFIGS: Final = ("bare", "otel", "floor", "envelope")
LABELS: Final = {
    "bare": "bare grpcio",
    "otel": "OTel",
    "floor": "OTel + floor",
    "envelope": "OTel + envelope",
}
#: The configurations whose spans and trailers carry an envelope's attributes and id.
ENVELOPED: Final = frozenset({"floor", "envelope"})

#: A span attribute the envelope interceptor always sets, and its trailer.
ENVELOPE_ATTRIBUTE: Final = ATTR_ID
ENVELOPE_TRAILER: Final = ENVELOPE_ID_METADATA


# -- servicers: as little work as the method allows ---------------------------------


class SyncServicer(pb_grpc.ExecutionTestServiceServicer):
    """The ``grpc`` servicer."""

    def Run(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunResponse:
        return pb.RunResponse(index=1)

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        for index in range(request.run.count):
            yield pb.WatchResponse(run=pb.RunResponse(index=index))

    def Upload(self, request_iterator: Iterator[pb.UploadRequest], context: grpc.ServicerContext) -> Any:
        chunks = size = 0
        for chunk in request_iterator:
            chunks += 1
            size += len(chunk.data)
        return pb.UploadResponse(chunks=chunks, bytes=size)

    def Exchange(self, request_iterator: Iterator[pb.ExchangeRequest], context: Any) -> Any:  # not measured
        for chunk in request_iterator:
            yield pb.ExchangeResponse(data=chunk.chunk.data)

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:  # not measured
        return pb.PingResponse(text=request.text)


class AioServicer(pb_grpc.ExecutionTestServiceServicer):
    """The ``grpc.aio`` servicer."""

    async def Run(self, request: pb.RunRequest, context: Any) -> pb.RunResponse:
        return pb.RunResponse(index=1)

    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.WatchResponse]:
        for index in range(request.run.count):
            yield pb.WatchResponse(run=pb.RunResponse(index=index))

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadRequest], context: Any) -> Any:
        chunks = size = 0
        async for chunk in request_iterator:
            chunks += 1
            size += len(chunk.data)
        return pb.UploadResponse(chunks=chunks, bytes=size)

    async def Exchange(self, request_iterator: AsyncIterator[pb.ExchangeRequest], context: Any) -> Any:
        async for chunk in request_iterator:  # not measured
            yield pb.ExchangeResponse(data=chunk.chunk.data)

    async def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:  # not measured
        return pb.PingResponse(text=request.text)


# -- telemetry ----------------------------------------------------------------------


class DropExporter(SpanExporter):
    """Counts spans (and those carrying envelope attributes), keeps none but
    the attributes of the first span with envelope attributes (``sample``)."""

    def __init__(self) -> None:
        self.spans = 0
        self.enveloped = 0
        self.sample: dict[str, Any] | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        for span in spans:
            if span.attributes and ENVELOPE_ATTRIBUTE in span.attributes:
                self.enveloped += 1
                if self.sample is None:
                    self.sample = dict(span.attributes)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def reset(self) -> None:
        self.spans = self.enveloped = 0


def tracer_provider() -> tuple[TracerProvider, DropExporter]:
    """A real SDK provider: every span is recorded, batched and exported."""
    exporter = DropExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


# -- the three configurations ----------------------------------------------------------


def envelope_config() -> Any:
    """A realistic configuration whose limits never trigger on the benchmark's requests."""
    from envelope_grpc import EnvelopeConfig, Limit, LimitsPolicy
    from envelope_grpc.v1.envelope_pb2 import ResourceDimension

    limits = [
        Limit(ResourceDimension.RESOURCE_DIMENSION_TOKENS, 1_000_000),
        Limit(ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT, 64),
        Limit(ResourceDimension.RESOURCE_DIMENSION_BYTES, 1 << 40),
    ]
    return EnvelopeConfig(policies=[LimitsPolicy(limits)])


def interceptors(flavour: str, config: str, provider: TracerProvider) -> list[Any]:
    """The server interceptors of one configuration: none, OpenTelemetry's
    alone, OpenTelemetry's and the floor (see _floor), or the envelope's whole
    chain, of which OpenTelemetry's is the first."""
    if config == "bare":
        return []
    import envelope_grpc
    import envelope_grpc.aio
    from benchmarks import _floor

    module: Any = envelope_grpc if flavour == "grpc" else envelope_grpc.aio
    chain = list(module.server_interceptors(envelope_config(), tracer_provider=provider))
    if config == "otel":
        return chain[:1]
    if config == "floor":
        floor = _floor.FloorServerInterceptor() if flavour == "grpc" else _floor.AioFloorServerInterceptor()
        return [chain[0], floor]
    return chain


# -- requests -----------------------------------------------------------------------


def run_request(count: int = 0) -> pb.RunRequest:
    """A typical annotated request: target, tenant, resources and scope to extract."""
    return pb.RunRequest(
        model="llama-3-8b-instruct",
        version="2024-07",
        tenant="acme",
        max_tokens=512,
        accelerators=pb.Accelerators(count=1, type="nvidia-h100", memory_gib=80),
        region="eu-west-1",
        classification="internal",
        engine="vllm",
        purpose="benchmark",
        behavior="ok",
        count=count,
    )


def upload_chunks(count: int, size: int = 256) -> list[pb.UploadRequest]:
    """``count`` chunks of ``size`` bytes; the first names the destination."""
    data = bytes(size)
    first = pb.UploadRequest(
        destination="s3://bench/blob", declared_bytes=count * size, classification="internal", data=data
    )
    return [first] + [pb.UploadRequest(data=data) for _ in range(count - 1)]
