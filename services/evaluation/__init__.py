"""The evaluation service: evaluates built-in numpy models on built-in labelled
datasets for real, streaming progress per batch (`python -m services.evaluation`).

Its requests map into envelopes through the annotations on
`proto/services/evaluation/v1/evaluation.proto` alone; see `_service` for the
backend's steps (refusals, the CPU-only grant, the binding).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import grpc

from services._runtime import Service
from services.evaluation._catalog import Catalog, builtin
from services.evaluation._service import DEFAULT_BATCH, MAX_BATCH, EvaluationServicer
from services.evaluation.v1 import evaluation_pb2_grpc as pb_grpc

#: The full gRPC service name.
SERVICE_NAME = "services.evaluation.v1.EvaluationService"

__all__ = ["SERVICE_NAME", "EvaluationServicer", "services"]


def services(
    *,
    catalog: Catalog | None = None,
    node: str = "",
    max_batch: int = MAX_BATCH,
    default_batch: int = DEFAULT_BATCH,
    clock: Callable[[], float] = time.monotonic,
) -> list[Service]:
    """The evaluation service, over the built-in catalog unless another is
    given; ``node`` names the binding's node (default: this host's name) and
    ``clock`` (seconds) times the evaluation against its granted duration."""
    servicer = EvaluationServicer(
        catalog or builtin(),
        node=node or platform.node() or "localhost",
        max_batch=max_batch,
        default_batch=default_batch,
        clock=clock,
    )

    def register(server: grpc.Server) -> None:
        pb_grpc.add_EvaluationServiceServicer_to_server(servicer, server)

    return [Service(SERVICE_NAME, register)]
