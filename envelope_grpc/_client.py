"""The ``grpc`` client interceptor: carries the current envelope's lineage."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from envelope_grpc._constants import ENVELOPE_METADATA
from envelope_grpc._core import CURRENT, envelope_context

_Pairs = Iterable[tuple[str, str | bytes]]


def with_envelope(metadata: _Pairs | None) -> list[tuple[str, str | bytes]] | None:
    """``metadata`` plus the current envelope's compact form (replacing any
    that a caller put there); None outside an intercepted call, when the
    call goes out as it is."""
    call = CURRENT.get()
    if call is None:
        return None
    pairs = [(key, value) for key, value in metadata or () if key != ENVELOPE_METADATA]
    pairs.append((ENVELOPE_METADATA, envelope_context(call.env)))
    return pairs


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str | bytes]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata  # type: ignore[assignment]
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class EnvelopeClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Attaches the current envelope as ``x-execution-envelope-bin`` to
    outgoing calls: ``grpc.intercept_channel(channel, EnvelopeClientInterceptor())``."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        pairs = with_envelope(details.metadata)
        return continuation(details if pairs is None else _ClientCallDetails(details, pairs), request)

    # One method serves every arity: only the call details change.
    intercept_unary_stream = intercept_unary_unary  # type: ignore[assignment]
    intercept_stream_unary = intercept_unary_unary  # type: ignore[assignment]
    intercept_stream_stream = intercept_unary_unary  # type: ignore[assignment]
