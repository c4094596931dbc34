"""The model deployment service: places model servers' replicas onto a
configured inventory of accelerator nodes, and records each deploy's grant
and binding in its execution envelope.

``python -m services.deployment`` serves it; the inventory comes from the
JSON file named by ``ENVELOPE_GRPC_DEPLOYMENT_INVENTORY`` or is the embedded
default (see ``services.deployment.placement``).
"""

from __future__ import annotations

import os
from typing import Final

import grpc

from services._runtime import Service
from services.deployment.placement import DEFAULT_INVENTORY, Inventory
from services.deployment.service import SERVICE_NAME, DeploymentServicer
from services.deployment.v1 import deployment_pb2_grpc as pb_grpc

__all__ = [
    "INVENTORY_VARIABLE",
    "SERVICE_NAME",
    "DeploymentServicer",
    "Inventory",
    "configured_inventory",
    "services",
]

#: Environment variable naming a JSON inventory file.
INVENTORY_VARIABLE: Final = "ENVELOPE_GRPC_DEPLOYMENT_INVENTORY"


def configured_inventory() -> Inventory:
    """The inventory file named by ENVELOPE_GRPC_DEPLOYMENT_INVENTORY, or the
    embedded default."""
    path = os.environ.get(INVENTORY_VARIABLE)
    return Inventory.load(path) if path else DEFAULT_INVENTORY


def services(inventory: Inventory | None = None) -> list[Service]:
    """The deployment service, over ``inventory`` (default: the configured one)."""
    servicer = DeploymentServicer(inventory if inventory is not None else configured_inventory())

    def register(server: grpc.Server) -> None:
        pb_grpc.add_DeploymentServiceServicer_to_server(servicer, server)

    return [Service(name=SERVICE_NAME, register=register)]
