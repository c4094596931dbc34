"""The handler API: the current call's envelope, and the backend's steps."""

from __future__ import annotations

import grpc

from envelope_grpc import _constants as k
from envelope_grpc import _envelope as model
from envelope_grpc._core import CURRENT, abort_status
from envelope_grpc.v1.envelope_pb2 import Binding, ExecutionEnvelope, Resources, Usage


def current_envelope() -> ExecutionEnvelope | None:
    """The envelope of the call being handled, or None outside an intercepted
    call. Works in sync and aio handlers and inside response generators."""
    call = CURRENT.get()
    return call.envelope() if call is not None else None


def _required() -> ExecutionEnvelope:
    call = CURRENT.get()
    if call is None:
        raise RuntimeError(
            "no execution envelope: not inside a call intercepted by EnvelopeServerInterceptor"
        )
    return call.envelope()


def record_grant(resources: Resources, *, reason_code: str = "", reason: str = "") -> int:
    """Record the backend's final grant (state GRANTED); returns how it
    compares with the request (a DecisionOutcome). A grant that differs from
    the request needs a reason code and a reason."""
    return model.record_grant(
        _required(), resources, reason_code=reason_code, reason=reason, actor=k.ACTOR_BACKEND
    )


def record_binding(binding: Binding) -> None:
    """Record placement and routing (state BOUND)."""
    model.record_binding(_required(), binding, actor=k.ACTOR_BACKEND)


def record_usage(usage: Usage) -> None:
    """Merge what the execution actually used (tokens, bytes moved, ...)."""
    model.record_usage(_required(), usage)


def reject(
    reason_code: str, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
) -> grpc.Status:
    """Record the backend's refusal (state REJECTED) and return the status to
    abort with: ``context.abort_with_status(status)`` in grpc, or
    ``await context.abort(status.code, status.details, status.trailing_metadata)``
    in grpc.aio. It carries an ErrorInfo with the reason and envelope id."""
    env = _required()
    model.reject(env, reason_code, message, status_code=code.value[0], actor=k.ACTOR_BACKEND)
    return abort_status(env, code, reason_code, message, {})


def fail(reason_code: str, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> grpc.Status:
    """Record why the backend fails the call (at any step after admission)
    and return the status to abort with, carrying an ErrorInfo; the envelope
    ends FAILED with this reason when the call ends."""
    env = _required()
    model.record_failure(env, reason_code)
    return abort_status(env, code, reason_code, message, {})
