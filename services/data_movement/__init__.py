"""The data movement service: uploads, downloads and copies objects between
named stores on local disk (`python -m services.data_movement [--root DIR]`).

Its requests map into envelopes through the annotations on
`proto/services/data_movement/v1/data_movement.proto` alone; see `_service`
for the backend's steps (refusals, verification, grant, binding, usage).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import grpc

from services._runtime import Service
from services.data_movement._service import DEFAULT_CHUNK, DataMovementServicer
from services.data_movement._stores import DEFAULT_STORES, Stores, StoreSpec
from services.data_movement.v1 import data_movement_pb2_grpc as pb_grpc

#: The full gRPC service name.
SERVICE_NAME = "services.data_movement.v1.DataMovementService"

__all__ = ["DEFAULT_STORES", "SERVICE_NAME", "DataMovementServicer", "StoreSpec", "Stores", "services"]


def services(
    root: str | os.PathLike[str] | None = None,
    *,
    stores: Mapping[str, StoreSpec] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> list[Service]:
    """The data movement service over the stores under ``root`` (default: a
    fresh temporary directory per call); ``stores`` defaults to DEFAULT_STORES."""
    servicer = DataMovementServicer(Stores(root, stores), chunk_size=chunk_size)

    def register(server: grpc.Server) -> None:
        pb_grpc.add_DataMovementServiceServicer_to_server(servicer, server)

    return [Service(SERVICE_NAME, register)]
