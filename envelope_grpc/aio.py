"""The ``grpc.aio`` shells: server interceptor and client interceptors.

Same core as the ``grpc`` ones; only awaiting differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import grpc
import grpc.aio
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from envelope_grpc._client import with_envelope
from envelope_grpc._core import CURRENT, AbortStatus, Call, Core, EnvelopeConfig, _cancelled, with_trailers
from envelope_grpc._extract import MethodPlan
from envelope_grpc._server import InterceptorBase, _Handler, behavior, rebuilt

__all__ = [
    "EnvelopeServerInterceptor",
    "EnvelopeStreamStreamClientInterceptor",
    "EnvelopeStreamUnaryClientInterceptor",
    "EnvelopeUnaryStreamClientInterceptor",
    "EnvelopeUnaryUnaryClientInterceptor",
    "client_interceptors",
    "server_interceptors",
]


async def _counted(call: Call, first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for message in rest:
        call.count_request(message)
        yield message


_UNREAD: Any = object()


class _View:
    """The servicer context as a handler sees it: trailing metadata the
    handler sets keeps the envelope's trailers (grpc.aio sends them as they
    stand when a handler aborts). Everything else is the context itself."""

    __slots__ = ("_call", "_context")

    def __init__(self, context: Any, call: Call) -> None:
        self._context = context
        self._call = call

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(self._kept(trailing_metadata))

    def _kept(self, trailing_metadata: Any) -> Any:
        """``trailing_metadata`` with the envelope's trailers, when there is any."""
        return with_trailers(self._call, trailing_metadata) if trailing_metadata else trailing_metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _AsyncView(_View):
    """The view of an async handler. For the other grpc.aio style,
    ``context.read()`` and ``context.write()``, the request message admission
    peeked at is read first, and every message read or written is counted."""

    __slots__ = ("_first",)

    def __init__(self, context: Any, call: Call, first: Any) -> None:
        super().__init__(context, call)
        self._first = first  # the peeked first request, EOF, or _UNREAD

    async def read(self) -> Any:
        first = self._first
        if first is not _UNREAD:
            if first is not grpc.aio.EOF:
                self._first = _UNREAD
            return first
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._call.count_request(message)
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._call.count_response(message)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        await self._context.abort(code, details, self._kept(trailing_metadata))
        raise RuntimeError("grpc.aio's abort returned")  # pragma: no cover - it always raises


grpc.aio.ServicerContext.register(_AsyncView)  # handlers may check what they were given


class _PlainView(_View):
    """The view of a plain (not async) handler on a grpc.aio server, which
    runs on a worker thread: what the aio context does by coroutine
    (``abort``, ``send_initial_metadata``) runs on the event loop, and the
    handler waits for it, as on a grpc server."""

    __slots__ = ("_loop",)

    def __init__(self, context: Any, call: Call, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(context, call)
        self._loop = loop

    def _on_loop(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self._on_loop(self._context.abort(code, details, self._kept(trailing_metadata)))  # raises the abort
        raise RuntimeError("grpc.aio's abort returned")  # pragma: no cover - it always raises

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._on_loop(self._context.send_initial_metadata(initial_metadata))

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.abort(status.code, status.details, status.trailing_metadata)


_END: Any = object()


async def _next(messages: AsyncIterator[Any]) -> Any:
    return await anext(messages, _END)


def _blocking(messages: AsyncIterator[Any], loop: asyncio.AbstractEventLoop, context: Any) -> Iterator[Any]:
    """An async request stream as a plain handler reads it, from a worker
    thread: a stream cut short by a cancel or the deadline raises RpcError,
    as a grpc server's request iterator does."""
    while (message := asyncio.run_coroutine_threadsafe(_next(messages), loop).result()) is not _END:
        yield message
    if _cancelled(context):
        raise grpc.RpcError("the call ended before its request stream")


def _advance(state: contextvars.Context, responses: Iterator[Any]) -> Any:
    """The next response of a plain generator (or _END), in its context."""
    return state.run(next, responses, _END)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: AbortStatus) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


class EnvelopeServerInterceptor(InterceptorBase, grpc.aio.ServerInterceptor):
    """Builds, admits, traces and reports an execution envelope for every call.

    Put OpenTelemetry's aio server interceptor before it (see server_interceptors).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        return self._intercept(await continuation(details), details.method, _wrap)


def _wrap(core: Core, plan: MethodPlan, handler: _Handler) -> _Handler:
    serve = behavior(handler)
    request_streaming = handler.request_streaming
    yields = inspect.isasyncgenfunction(serve)
    awaits = inspect.iscoroutinefunction(serve)
    # grpc.aio also serves plain functions and generators: they run on worker
    # threads (the loop's default executor), with a blocking view of the call.
    plain = not (yields or awaits)

    async def admit(context: Any, request: Any) -> tuple[Call, AbortStatus | None]:
        if not core.blocking:
            return core.begin(plan, context, request)
        # Policies that do I/O or have a time budget must not stall the loop. If
        # the call is cancelled meanwhile, admission still finishes on its
        # thread: then end the call there, so that what it took is given back.
        admission = asyncio.ensure_future(asyncio.to_thread(core.begin, plan, context, request))
        try:
            return await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(lambda done: _end_cancelled(core, done, context))
            raise

    async def end(call: Call, context: Any, error: BaseException | None = None) -> None:
        # Releasing blocking policies (a Redis quota) must not stall the loop; a
        # cancelled task cannot await, so it ends in place.
        if core.blocking_end and not isinstance(error, asyncio.CancelledError):
            await asyncio.to_thread(core.end, call, context, error)
        else:
            core.end(call, context, error)

    async def begin(request_or_iterator: Any, context: Any) -> tuple[Call, Any, Any]:
        """Admit the call; returns it, the handler's argument and context."""
        if request_streaming:
            iterator = aiter(request_or_iterator)
            first = await anext(iterator, None)
            call, status = await admit(context, first)
            argument: Any = _counted(call, first, iterator)
            peeked = grpc.aio.EOF if first is None else first
        else:
            call, status = await admit(context, request_or_iterator)
            argument = request_or_iterator
            peeked = _UNREAD
        if status is not None:
            await _abort(context, status)
        if not plain:
            return call, argument, _AsyncView(context, call, peeked)
        loop = asyncio.get_running_loop()
        if request_streaming:
            argument = _blocking(argument, loop, context)
        return call, argument, _PlainView(context, call, loop)

    async def unary_response(request_or_iterator: Any, context: Any) -> Any:
        call, argument, seen = await begin(request_or_iterator, context)
        CURRENT.set(call)  # each call runs in its own task, with its own context
        try:
            if awaits:
                response = await serve(argument, seen)
            else:
                response = await asyncio.to_thread(serve, argument, seen)
            call.count_response(response)
        except BaseException as error:
            await end(call, context, error)
            raise
        await end(call, context)
        return response

    async def stream_response(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
        call, argument, seen = await begin(request_or_iterator, context)
        CURRENT.set(call)
        try:
            if yields:
                async for response in serve(argument, seen):
                    call.count_response(response)
                    yield response
            elif awaits:  # a handler that writes with context.write()
                await serve(argument, seen)
            else:  # a plain generator, advanced on worker threads in one context
                responses = serve(argument, seen)
                loop, state = asyncio.get_running_loop(), contextvars.copy_context()
                advance = functools.partial(_advance, state, responses)
                try:
                    while (response := await loop.run_in_executor(None, advance)) is not _END:
                        call.count_response(response)
                        yield response
                finally:
                    # One still running on its thread (the call was cancelled) is closed when collected.
                    with contextlib.suppress(ValueError):
                        responses.close()
        except BaseException as error:
            await end(call, context, error)
            raise
        await end(call, context)

    return rebuilt(handler, unary_response, stream_response)


def _end_cancelled(
    core: Core, admission: asyncio.Future[tuple[Call, AbortStatus | None]], context: Any
) -> None:
    if admission.cancelled() or admission.exception() is not None:
        return
    call, _ = admission.result()
    core.end(call, context, asyncio.CancelledError())


def server_interceptors(
    config: EnvelopeConfig | None = None, *, tracer_provider: Any = None
) -> list[grpc.aio.ServerInterceptor]:
    """OpenTelemetry's aio server interceptor, then the envelope interceptor:
    the order in which envelope attributes land on the call's span."""
    return [aio_server_interceptor(tracer_provider=tracer_provider), EnvelopeServerInterceptor(config)]  # type: ignore[no-untyped-call]


# -- client ----------------------------------------------------------------------------

# grpc.aio files an interceptor under the first arity it matches, so each arity
# gets its own small class; all share _details.


def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    pairs = with_envelope(details.metadata)
    if pairs is None:
        return details
    metadata = grpc.aio.Metadata(*pairs)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class EnvelopeUnaryUnaryClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Carries the current envelope on unary-unary calls."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_details(details), request)


class EnvelopeUnaryStreamClientInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """Carries the current envelope on unary-stream calls."""

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_details(details), request)


class EnvelopeStreamUnaryClientInterceptor(grpc.aio.StreamUnaryClientInterceptor):
    """Carries the current envelope on stream-unary calls."""

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_details(details), request_iterator)


class EnvelopeStreamStreamClientInterceptor(grpc.aio.StreamStreamClientInterceptor):
    """Carries the current envelope on stream-stream calls."""

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_details(details), request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """One envelope client interceptor per arity, for ``grpc.aio.insecure_channel(..., interceptors=...)``."""
    return [
        EnvelopeUnaryUnaryClientInterceptor(),
        EnvelopeUnaryStreamClientInterceptor(),
        EnvelopeStreamUnaryClientInterceptor(),
        EnvelopeStreamStreamClientInterceptor(),
    ]
