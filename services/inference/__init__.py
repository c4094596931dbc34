"""The inference service: the KServe v2 / Open Inference Protocol over small
numpy models, served with the stubs tritonclient ships (so
``tritonclient.grpc.InferenceServerClient`` is its client).

``python -m services.inference [--port N] [--audit FILE]`` serves it alone.
"""

from __future__ import annotations

from tritonclient.grpc import service_pb2_grpc

from services._runtime import Service
from services.inference.extract import SERVICE, extractors
from services.inference.models import Repository
from services.inference.service import InferenceServicer

__all__ = ["SERVICE", "InferenceServicer", "services"]


def services(repository: Repository | None = None) -> list[Service]:
    """The inference service, ready for ``services._runtime.start``."""
    servicer = InferenceServicer(repository)
    return [
        Service(
            name=SERVICE,
            register=lambda server: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                servicer, server
            ),
            extractors=extractors(),
        )
    ]
