"""Real servers on 127.0.0.1:0, in both flavours, with spans in memory.

Every interceptor test takes the ``backend`` factory, parametrized over
``grpc`` and ``grpc.aio`` servers. An aio server runs on its own event loop
in a thread, so each behaviour is written once and driven by the same
synchronous client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import envelope_grpc
import envelope_grpc.aio
from envelope_grpc import EnvelopeConfig
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc
from envelope_grpc.v1.envelope_pb2 import Binding, ExecutionEnvelope, LifecycleState, Resources, Usage


class Collector:
    """An audit sink that keeps envelopes in memory."""

    def __init__(self) -> None:
        self.envelopes: list[ExecutionEnvelope] = []
        self.ready = threading.Condition()

    def write(self, envelopes: Any, /) -> None:
        with self.ready:
            self.envelopes.extend(envelopes)
            self.ready.notify_all()

    def close(self) -> None:
        pass

    def wait(self, count: int, timeout: float = 5.0) -> list[ExecutionEnvelope]:
        with self.ready:
            assert self.ready.wait_for(lambda: len(self.envelopes) >= count, timeout), (
                f"expected {count} envelopes, got {len(self.envelopes)}"
            )
            return list(self.envelopes)


def perform(request: pb.RunRequest) -> pb.RunResponse | grpc.Status:
    """The handler's work, shared by both servicers; a Status means abort."""
    env = envelope_grpc.current_envelope()
    assert env is not None
    if request.behavior in ("grant", "bind"):
        granted = Resources()
        granted.CopyFrom(env.requested)
        granted.memory_bytes = 8 << 30
        envelope_grpc.record_grant(
            granted, reason_code="MEMORY_COMPUTED", reason="memory sized by the backend"
        )
    if request.behavior == "bind":
        envelope_grpc.record_binding(
            Binding(node="node-a", accelerator_indexes=[0, 1], endpoint="10.0.0.5:8001")
        )
    if request.behavior == "usage":
        envelope_grpc.record_usage(Usage(tokens=42))
    if request.behavior == "reject":
        return envelope_grpc.reject("INSUFFICIENT_CAPACITY", "no node has 8 free accelerators")
    if request.behavior == "fail":
        raise RuntimeError("handler failed")
    if request.behavior == "unavailable":
        return envelope_grpc.fail("MODEL_UNAVAILABLE", "the model is not loaded", grpc.StatusCode.UNAVAILABLE)
    if request.behavior == "set_code":
        return pb.RunResponse()
    return pb.RunResponse(
        envelope_id=env.envelope_id,
        payload=request.payload,
        parent_envelope_id=env.lineage.parent_envelope_id,
    )


class SyncServicer(pb_grpc.ExecutionTestServiceServicer):
    def __init__(self, downstream: Callable[[], str] | None = None) -> None:
        self.downstream = downstream

    def Run(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunResponse:
        if request.behavior == "blind":  # never reads the envelope
            return pb.RunResponse(payload=request.payload)
        if request.behavior == "abort_own":  # with trailing metadata of its own
            context.set_trailing_metadata((("x-handler", "own"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if request.behavior == "abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if request.behavior in ("sleep", "busy"):
            time.sleep(0.5)
        if request.behavior == "set_code":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_trailing_metadata((("x-handler", "own"),))
        if request.behavior == "downstream":
            assert self.downstream is not None
            tracer = client_interceptor(tracer_provider=TRACER_HOLDER[0])
            with grpc.insecure_channel(self.downstream()) as channel:
                traced = intercept_channel(channel, tracer)
                stub = pb_grpc.ExecutionTestServiceStub(
                    grpc.intercept_channel(traced, envelope_grpc.EnvelopeClientInterceptor())
                )
                reply = stub.Run(pb.RunRequest(model="child", behavior="ok"))
            return pb.RunResponse(envelope_id=reply.envelope_id, parent_envelope_id=reply.parent_envelope_id)
        result = perform(request)
        if isinstance(result, grpc.Status):
            context.abort_with_status(result)
        return result

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        for index in range(request.run.count):
            env = envelope_grpc.current_envelope()
            assert env is not None
            yield pb.WatchResponse(run=pb.RunResponse(envelope_id=env.envelope_id, index=index))

    def Upload(
        self, request_iterator: Iterator[pb.UploadRequest], context: grpc.ServicerContext
    ) -> pb.UploadResponse:
        chunks = size = 0
        for chunk in request_iterator:
            chunks += 1
            size += len(chunk.data)
        env = envelope_grpc.current_envelope()
        assert env is not None
        return pb.UploadResponse(chunks=chunks, bytes=size, envelope_id=env.envelope_id)

    def Exchange(
        self, request_iterator: Iterator[pb.ExchangeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExchangeResponse]:
        for request in request_iterator:
            yield pb.ExchangeResponse(data=request.chunk.data)

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse(text=request.text)


class AsyncServicer(pb_grpc.ExecutionTestServiceServicer):
    def __init__(self, downstream: Callable[[], str] | None = None) -> None:
        self.downstream = downstream

    async def Run(self, request: pb.RunRequest, context: grpc.aio.ServicerContext) -> pb.RunResponse:  # type: ignore[override]
        if request.behavior == "blind":  # never reads the envelope
            return pb.RunResponse(payload=request.payload)
        if request.behavior == "abort_own":  # with trailing metadata of its own
            context.set_trailing_metadata((("x-handler", "own"),))
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if request.behavior == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        if request.behavior == "sleep":
            await asyncio.sleep(0.5)
        if request.behavior == "busy":  # work that does not await, past the deadline
            time.sleep(0.5)  # noqa: ASYNC251 (the point: it blocks)
        if request.behavior == "set_code":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_trailing_metadata((("x-handler", "own"),))
        if request.behavior == "downstream":
            assert self.downstream is not None
            interceptors = [
                *aio_client_interceptors(tracer_provider=TRACER_HOLDER[0]),
                *envelope_grpc.aio.client_interceptors(),
            ]
            async with grpc.aio.insecure_channel(self.downstream(), interceptors=interceptors) as channel:
                reply = await pb_grpc.ExecutionTestServiceStub(channel).Run(
                    pb.RunRequest(model="child", behavior="ok")
                )
            return pb.RunResponse(envelope_id=reply.envelope_id, parent_envelope_id=reply.parent_envelope_id)
        result = perform(request)
        if isinstance(result, grpc.Status):
            await context.abort(result.code, result.details, result.trailing_metadata)
        assert isinstance(result, pb.RunResponse)
        return result

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        for index in range(request.run.count):
            env = envelope_grpc.current_envelope()
            assert env is not None
            yield pb.WatchResponse(run=pb.RunResponse(envelope_id=env.envelope_id, index=index))

    async def Upload(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.UploadResponse:  # type: ignore[override]
        # Requests read with context.read(), the other aio streaming style.
        assert isinstance(context, grpc.aio.ServicerContext)
        chunks = size = 0
        while (chunk := await context.read()) is not grpc.aio.EOF:
            chunks += 1
            size += len(chunk.data)
        env = envelope_grpc.current_envelope()
        assert env is not None
        return pb.UploadResponse(chunks=chunks, bytes=size, envelope_id=env.envelope_id)

    async def Exchange(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        # Responses written with context.write(), the other aio streaming style.
        async for request in request_iterator:
            await context.write(pb.ExchangeResponse(data=request.chunk.data))

    async def Ping(self, request: pb.PingRequest, context: grpc.aio.ServicerContext) -> pb.PingResponse:  # type: ignore[override]
        return pb.PingResponse(text=request.text)


# The tracer provider of the running test, for servicers that call downstream.
TRACER_HOLDER: list[TracerProvider | None] = [None]


class Backend:
    """A running server of one flavour with the envelope interceptors."""

    def __init__(
        self,
        flavor: str,
        config: EnvelopeConfig,
        tracer_provider: TracerProvider | None,
        downstream: Callable[[], str] | None = None,
        *,
        server_credentials: grpc.ServerCredentials | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        servicer: pb_grpc.ExecutionTestServiceServicer | None = None,
    ) -> None:
        self.flavor = flavor
        self.servicer = servicer
        self.server_credentials = server_credentials
        self.collector = Collector()
        self.config = dataclasses.replace(config, sinks=(*config.sinks, self.collector))
        self.tracer_provider = tracer_provider
        self.downstream = downstream
        self._stop: Callable[[], None] = lambda: None
        self.port = self._start_sync() if flavor == "grpc" else self._start_aio()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = (
            grpc.secure_channel(self.address, channel_credentials)
            if channel_credentials is not None
            else grpc.insecure_channel(self.address)
        )
        self.stub = pb_grpc.ExecutionTestServiceStub(self.channel)

    def _interceptors(self, module: Any) -> list[Any]:
        if self.tracer_provider is None:
            return [module.EnvelopeServerInterceptor(self.config)]
        return list(module.server_interceptors(self.config, tracer_provider=self.tracer_provider))

    def _bind(self, server: Any) -> int:
        address = "127.0.0.1:0"
        if self.server_credentials is not None:
            return int(server.add_secure_port(address, self.server_credentials))
        return int(server.add_insecure_port(address))

    def _start_sync(self) -> int:
        interceptors = self._interceptors(envelope_grpc)
        self.interceptor = interceptors[-1]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors)
        servicer = self.servicer or SyncServicer(self.downstream)
        pb_grpc.add_ExecutionTestServiceServicer_to_server(servicer, server)
        port = self._bind(server)
        server.start()
        self._stop = lambda: server.stop(None).wait()
        return port

    def _start_aio(self) -> int:
        started: futures.Future[int] = futures.Future()
        loop = asyncio.new_event_loop()
        stopped = asyncio.Event()

        async def serve() -> None:
            interceptors = self._interceptors(envelope_grpc.aio)
            self.interceptor = interceptors[-1]
            if self.flavor == "aio-sync":  # plain handlers, run by grpc.aio on a thread pool
                server = grpc.aio.server(
                    interceptors=interceptors, migration_thread_pool=futures.ThreadPoolExecutor(4)
                )
                servicer: Any = SyncServicer(self.downstream)
            else:
                server = grpc.aio.server(interceptors=interceptors)
                servicer = AsyncServicer(self.downstream)
            pb_grpc.add_ExecutionTestServiceServicer_to_server(self.servicer or servicer, server)
            port = self._bind(server)
            await server.start()
            started.set_result(port)
            await stopped.wait()
            await server.stop(None)

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()

        def stop() -> None:
            loop.call_soon_threadsafe(stopped.set)
            thread.join(10)
            loop.close()

        self._stop = stop
        return started.result(10)

    def envelopes(self, count: int) -> list[ExecutionEnvelope]:
        """The first ``count`` envelopes the server reported."""
        return self.collector.wait(count)

    def close(self) -> None:
        self.channel.close()
        self._stop()
        self.interceptor.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    TRACER_HOLDER[0] = provider
    exporter.provider = provider  # type: ignore[attr-defined]
    yield exporter
    TRACER_HOLDER[0] = None
    provider.shutdown()


@pytest.fixture(params=["grpc", "aio"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(flavor: str, spans: InMemorySpanExporter) -> Iterator[Callable[..., Backend]]:
    """Start a server of the test's flavour: backend(config=..., traced=True);
    ``servicer`` replaces the flavour's own."""
    started: list[Backend] = []

    def start(
        config: EnvelopeConfig | None = None,
        *,
        traced: bool = True,
        downstream: Callable[[], str] | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        servicer: pb_grpc.ExecutionTestServiceServicer | None = None,
    ) -> Backend:
        server = Backend(
            flavor,
            config or EnvelopeConfig(),
            spans.provider if traced else None,  # type: ignore[attr-defined]
            downstream,
            server_credentials=server_credentials,
            channel_credentials=channel_credentials,
            servicer=servicer,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def states(env: ExecutionEnvelope) -> list[str]:
    """The names of the states an envelope went through, e.g. ["RECEIVED", ...]."""
    return [
        LifecycleState.Name(step.to).removeprefix("LIFECYCLE_STATE_") for step in env.lifecycle.transitions
    ]


#: The lifecycle of a call the backend granted, bound and completed.
COMPLETED_PATH = [
    LifecycleState.LIFECYCLE_STATE_RECEIVED,
    LifecycleState.LIFECYCLE_STATE_NORMALIZED,
    LifecycleState.LIFECYCLE_STATE_ADMITTED,
    LifecycleState.LIFECYCLE_STATE_GRANTED,
    LifecycleState.LIFECYCLE_STATE_BOUND,
    LifecycleState.LIFECYCLE_STATE_COMPLETED,
]


def transitions(env: ExecutionEnvelope) -> list[int]:
    """The states an envelope went through, as numbers."""
    return [step.to for step in env.lifecycle.transitions]


def first_grant(env: ExecutionEnvelope, stage: int) -> Any:
    """The envelope's first grant of ``stage``."""
    return next(g for g in env.grants if g.stage == stage)


def only_grant(env: ExecutionEnvelope, stage: int) -> Any:
    """The envelope's grant of ``stage``, which must be its only one."""
    (grant,) = [g for g in env.grants if g.stage == stage]
    return grant


def server_span(spans: InMemorySpanExporter, method: str, count: int = 1) -> ReadableSpan:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [s for s in spans.get_finished_spans() if s.name == method and s.kind is SpanKind.SERVER]
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.01)
    raise AssertionError(f"no server span for {method}")


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    """The error ``call`` ends with (it must end with one)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def refusal_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """A refusal's status code, and its ErrorInfo's reason and metadata."""
    info = error_info(error)
    return error.code(), info.reason, dict(info.metadata)  # type: ignore[attr-defined]
