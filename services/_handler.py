"""What the example servicers share inside a handler: refusing a request,
aborting, and building the backend's grant on admission's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NoReturn

import grpc

import envelope_grpc
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope, Grant, GrantStage, Resources

_ADMISSION: Final = GrantStage.GRANT_STAGE_ADMISSION


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort``, which never returns."""
    context.abort(code, details)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def refuse(context: grpc.ServicerContext, reason_code: str, message: str, code: grpc.StatusCode) -> NoReturn:
    """Refuse the request before any backend grant: its envelope ends
    REJECTED with ``reason_code`` (an ErrorInfo carries it); without the
    envelope interceptor, a plain status."""
    if envelope_grpc.current_envelope() is None:
        abort(context, code, message)
    context.abort_with_status(envelope_grpc.reject(reason_code, message, code))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def admission_grant(env: ExecutionEnvelope | None) -> Grant | None:
    """The grant admission made, if any."""
    if env is None:
        return None
    return next((grant for grant in env.grants if grant.stage == _ADMISSION), None)


def starting_grant(env: ExecutionEnvelope) -> Resources:
    """A copy of what admission granted (or of the request): where a
    backend's own grant starts."""
    admission = admission_grant(env)
    granted = Resources()
    granted.CopyFrom(admission.resources if admission is not None else env.requested)
    return granted


def record_backend_grant(
    env: ExecutionEnvelope, granted: Resources, reasons: Sequence[tuple[str, str]]
) -> None:
    """Record the backend's grant with its reasons (code, words): admission's
    own reason first when it narrowed, the first code as the reason code."""
    admission = admission_grant(env)
    if admission is not None and admission.reason_code:
        reasons = [(admission.reason_code, admission.reason or "as granted at admission"), *reasons]
    envelope_grpc.record_grant(
        granted,
        reason_code=reasons[0][0] if reasons else "",
        reason="; ".join(words for _, words in reasons),
    )
