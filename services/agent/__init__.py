"""The agent workflow service: a planner step, then a fan-out of tool steps
that call the inference service downstream, within the caller's budget.

``python -m services.agent --inference HOST:PORT [--port N] [--audit FILE]``
serves it alone.
"""

from __future__ import annotations

from opentelemetry.trace import TracerProvider

from services._runtime import Service
from services.agent.service import AgentServicer
from services.agent.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["DEFAULT_INFERENCE_ADDRESS", "SERVICE", "AgentServicer", "services"]

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
#: Where the inference service is assumed to listen when not told (Triton's gRPC port).
DEFAULT_INFERENCE_ADDRESS = "127.0.0.1:8001"


def services(
    inference_address: str = DEFAULT_INFERENCE_ADDRESS, *, tracer_provider: TracerProvider | None = None
) -> list[Service]:
    """The agent service calling the inference service at ``inference_address``.

    ``tracer_provider`` records the downstream calls' client spans; without
    one the global provider is used (the trace context is carried either way).
    """
    servicer = AgentServicer(inference_address, tracer_provider=tracer_provider)
    return [
        Service(
            name=SERVICE,
            register=lambda server: agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server),
            close=servicer.tools.close,
        )
    ]
