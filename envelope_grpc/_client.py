"""The ``grpc`` client interceptor: carries the current envelope's lineage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from envelope_grpc._constants import ENVELOPE_METADATA
from envelope_grpc._core import CURRENT, envelope_context

_Pairs = Sequence[tuple[str, str | bytes]]


def with_envelope(metadata: _Pairs | None) -> list[tuple[str, str | bytes]] | None:
    """``metadata`` plus the current envelope's compact form (replacing any
    that a caller put there); unchanged outside an intercepted call."""
    env = CURRENT.get()
    if env is None:
        return None if metadata is None else list(metadata)
    pairs = [(key, value) for key, value in metadata or () if key != ENVELOPE_METADATA]
    pairs.append((ENVELOPE_METADATA, envelope_context(env)))
    return pairs


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = with_envelope(details.metadata)  # type: ignore[assignment]
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
        return continuation(_ClientCallDetails(details), request)

    # One method serves every arity: only the call details change.
    intercept_unary_stream = intercept_unary_unary  # type: ignore[assignment]
    intercept_stream_unary = intercept_unary_unary  # type: ignore[assignment]
    intercept_stream_stream = intercept_unary_unary  # type: ignore[assignment]
