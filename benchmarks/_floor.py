"""The floor: the least an envelope interceptor adds on a call's thread.

An interceptor that reports a call the way the envelope interceptor does, and
does nothing else: the envelope's two trailers (with a fresh id) before the
handler, the span attributes of the benchmark's unary call in one
``set_attributes`` call after it, and one generator layer per streaming
direction. No envelope, no extraction, no policy, no metrics. Measured after
OpenTelemetry's interceptor, like the envelope's, it shows how much of the
envelope's cost any such report costs, and how much is the envelope's own work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Final

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from envelope_grpc import _constants as k
from envelope_grpc._core import trailers
from envelope_grpc._envelope import new_id
from envelope_grpc._server import WrappedHandlers, _Handler, behavior, rebuilt
from envelope_grpc._values import OUTCOME_ADMITTED

#: The attributes the envelope interceptor sets on the span of a Run call of
#: ``_service.run_request()``, but for its ids and lifecycle (which the floor
#: makes per call); every run checks that they are the same (``differences``).
ATTRIBUTES: Final[dict[str, AttributeValue]] = {
    k.ATTR_KIND: "inference",
    k.ATTR_STATE: "completed",
    k.ATTR_OUTCOME: "admitted",
    k.ATTR_PRINCIPAL_KIND: "anonymous",
    k.ATTR_AUTH: "none",
    k.ATTR_TARGET_TYPE: "model",
    k.ATTR_TARGET_NAME: "llama-3-8b-instruct",
    k.ATTR_TARGET_VERSION: "2024-07",
    k.ATTR_TENANT: "acme",
    k.ATTR_REGION: "eu-west-1",
    k.ATTR_CLASSIFICATION: "internal",
    k.ATTR_MODE: "enforce",
    k.ATTR_REQUESTED_PREFIX + "accelerator_count": 1,
    k.ATTR_REQUESTED_PREFIX + "accelerator_type": "nvidia-h100",
    k.ATTR_REQUESTED_PREFIX + "accelerator_memory_bytes": 80 << 30,
    k.ATTR_REQUESTED_PREFIX + "tokens": 512,
}


#: Attributes whose values differ from call to call.
_PER_CALL: Final = frozenset({k.ATTR_ID, k.ATTR_REQUEST_ID, k.ATTR_LIFECYCLE})


def differences(floor: Mapping[str, Any] | None, envelope: Mapping[str, Any] | None) -> list[str]:
    """How the envelope attributes on the span of the floor's Run call differ
    from those on the envelope's (values that differ per call aside): empty
    when alike."""
    if floor is None or envelope is None:
        return [f"no span with envelope attributes from the {'floor' if floor is None else 'envelope'}"]
    ours, theirs = _enveloped(floor), _enveloped(envelope)
    found = [
        f"{key}: only the {'floor' if key in ours else 'envelope'} sets it"
        for key in ours.keys() ^ theirs.keys()
    ]
    found += [
        f"{key}: {ours[key]!r} against {theirs[key]!r}"
        for key in ours.keys() & theirs.keys()
        if key not in _PER_CALL and ours[key] != theirs[key]
    ]
    return sorted(found)


def _enveloped(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if key.startswith(_PREFIX)}


_PREFIX: Final = k.NAMESPACE + "."


class _Report:
    """One call's report: its trailers at the start, its span's attributes at the end."""

    __slots__ = ("envelope_id", "started_ns")

    def __init__(self, context: Any) -> None:
        self.started_ns = time.time_ns()
        self.envelope_id = new_id()
        context.set_trailing_metadata(trailers(self.envelope_id, OUTCOME_ADMITTED))

    def end(self) -> None:
        elapsed_us = (time.time_ns() - self.started_ns) // 1000
        trace.get_current_span().set_attributes(
            {
                **ATTRIBUTES,
                k.ATTR_ID: self.envelope_id,
                k.ATTR_REQUEST_ID: new_id(),
                k.ATTR_LIFECYCLE: f"received:0 completed:{elapsed_us}",
            }
        )


def _wrapped(
    wrapped: WrappedHandlers, method: str, handler: _Handler | None, wrap: Callable[[_Handler], _Handler]
) -> _Handler | None:
    if handler is None:
        return None
    made = wrapped.get(method, handler)
    return made if made is not None else wrapped.put(method, handler, None, wrap(handler))


class FloorServerInterceptor(grpc.ServerInterceptor):
    """The floor for ``grpc`` servers."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()  # as the envelope interceptor keeps them

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        return _wrapped(self._wrapped, details.method, continuation(details), _wrap)


def _wrap(handler: _Handler) -> _Handler:
    serve = behavior(handler)

    def argument(request_or_iterator: Any) -> Any:
        return _passed(request_or_iterator) if handler.request_streaming else request_or_iterator

    def unary(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        report = _Report(context)
        response = serve(argument(request_or_iterator), context)
        report.end()
        return response

    def stream(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        report = _Report(context)
        yield from serve(argument(request_or_iterator), context)
        report.end()

    return rebuilt(handler, unary, stream)


def _passed(messages: Iterator[Any]) -> Iterator[Any]:
    yield from messages


class AioFloorServerInterceptor(grpc.aio.ServerInterceptor):
    """The floor for ``grpc.aio`` servers (whose handlers are all coroutines)."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        return _wrapped(self._wrapped, details.method, await continuation(details), _wrap_aio)


def _wrap_aio(handler: _Handler) -> _Handler:
    serve = behavior(handler)

    def argument(request_or_iterator: Any) -> Any:
        return _passed_aio(request_or_iterator) if handler.request_streaming else request_or_iterator

    async def unary(request_or_iterator: Any, context: Any) -> Any:
        report = _Report(context)
        response = await serve(argument(request_or_iterator), context)
        report.end()
        return response

    async def stream(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
        report = _Report(context)
        async for response in serve(argument(request_or_iterator), context):
            yield response
        report.end()

    return rebuilt(handler, unary, stream)


async def _passed_aio(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in messages:
        yield message
