"""The ``grpc`` server interceptor: a thin shell around the core."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from envelope_grpc._core import CURRENT, Call, Core, EnvelopeConfig
from envelope_grpc._extract import Action, MethodPlan
from envelope_grpc._sinks import SinkStats

if TYPE_CHECKING:
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
_FACTORIES: dict[tuple[bool, bool], tuple[str, Callable[..., _Handler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


_MAX_WRAPPED = 4096


def behavior(handler: _Handler) -> Callable[..., Any]:
    """The function that serves ``handler``'s calls."""
    name, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return getattr(handler, name)  # type: ignore[no-any-return]


def rebuilt(handler: _Handler, unary: Callable[..., Any], stream: Callable[..., Any]) -> _Handler:
    """A handler of ``handler``'s shape and (de)serializers that serves its
    calls with ``stream`` when it streams responses, else with ``unary``."""
    _, factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        stream if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def counted(call: Call, first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    """The request stream as the handler sees it: the peeked first message,
    then the rest, each counted."""
    if first is None:
        return
    yield first
    for message in rest:
        call.count_request(message)
        yield message


class WrappedHandlers:
    """The wrapped handler of each method, with the handler (and whatever
    else) it was made from: a server hands out the same handler for every
    call of a method, so each is wrapped once, and again only when what it
    was made from changes. Bounded: methods may be many."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[_Handler, object, _Handler]] = {}

    def get(self, method: str, handler: _Handler, made_with: object = None) -> _Handler | None:
        """The wrapped handler of ``method`` made from ``handler`` and ``made_with``, or None."""
        cached = self._made.get(method)
        if cached is not None and cached[0] is handler and cached[1] is made_with:
            return cached[2]
        return None

    def put(self, method: str, handler: _Handler, made_with: object, wrapped: _Handler) -> _Handler:
        """Keep ``wrapped`` as ``method``'s; returns it."""
        if len(self._made) >= _MAX_WRAPPED:
            self._made.clear()
        self._made[method] = (handler, made_with, wrapped)
        return wrapped


class InterceptorBase:
    """What the grpc and grpc.aio server interceptors share: the core, the
    per-method decision to wrap or pass through, and the sink accessors."""

    def __init__(self, config: EnvelopeConfig | None = None) -> None:
        self.core = Core(config or EnvelopeConfig())
        # Made from the handler and the method's plan (which changes only
        # when the registry's rules do).
        self._wrapped = WrappedHandlers()

    def _intercept(
        self, handler: _Handler | None, method: str, wrap: Callable[[Core, MethodPlan, _Handler], _Handler]
    ) -> _Handler | None:
        if handler is None:
            return None
        plan = self.core.plan(method)
        wrapped = self._wrapped.get(method, handler, plan)
        if wrapped is not None:
            return wrapped
        made = handler if plan.action is Action.SKIP else wrap(self.core, plan, handler)
        return self._wrapped.put(method, handler, plan, made)

    def sink_stats(self) -> SinkStats | None:
        """The audit dispatcher's counters (None without sinks)."""
        return self.core.sink_stats()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every envelope reported so far was handed to the sinks
        (servers that share sinks all flush before any of them closes)."""
        return self.core.flush(timeout)

    def close(self) -> None:
        """Flush and close the audit sinks."""
        self.core.close()


class EnvelopeServerInterceptor(InterceptorBase, grpc.ServerInterceptor):
    """Builds, admits, traces and reports an execution envelope for every call.

    Put OpenTelemetry's server interceptor before it (see server_interceptors).
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        return self._intercept(continuation(details), details.method, _wrap)


def _wrap(core: Core, plan: MethodPlan, handler: _Handler) -> _Handler:
    serve = behavior(handler)
    request_streaming = handler.request_streaming

    def begin(request_or_iterator: Any, context: grpc.ServicerContext) -> tuple[Call, Any]:
        if request_streaming:
            try:
                first = next(request_or_iterator, None)
            except grpc.RpcError:  # the call ended before its first message: record it, then end
                call, _ = core.begin(plan, context, None)
                core.end(call, context)
                raise
            call, status = core.begin(plan, context, first)
            argument = counted(call, first, request_or_iterator)
        else:
            call, status = core.begin(plan, context, request_or_iterator)
            argument = request_or_iterator
        if status is not None:
            context.abort_with_status(status)
        return call, argument

    def unary_response(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        call, argument = begin(request_or_iterator, context)
        token = CURRENT.set(call)
        try:
            response = serve(argument, context)
            call.count_response(response)
        except BaseException as error:
            core.end(call, context, error)
            raise
        finally:
            CURRENT.reset(token)
        core.end(call, context)
        return response

    def stream_response(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call, argument = begin(request_or_iterator, context)
        token = CURRENT.set(call)
        try:
            for response in serve(argument, context):
                call.count_response(response)
                yield response
        except BaseException as error:
            core.end(call, context, error)
            raise
        finally:
            CURRENT.reset(token)
        core.end(call, context)

    return rebuilt(handler, unary_response, stream_response)
