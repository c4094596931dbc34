"""The whole example backend in one process: every service on its own
loopback port, as separate servers would be, each with the envelope
interceptors; the agent calls inference across servers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider

from envelope_grpc import EnvelopeConfig
from services import agent, data_movement, deployment, evaluation, inference
from services._runtime import Running, start

#: The services in start order (the agent needs inference's address).
NAMES = ("inference", "deployment", "evaluation", "data_movement", "agent")


@dataclasses.dataclass
class Backend:
    """The running services, by name."""

    running: dict[str, Running]
    root: str
    #: Whether ``root`` was made for this backend (and goes away with it).
    owns_root: bool = False

    def address(self, name: str) -> str:
        """host:port of one service."""
        return self.running[name].address

    def stop(self) -> None:
        """Stop every server (the agent first), then flush every server's audit
        queue before any closes the sinks they share."""
        stopped = [self.running.pop(name) for name in reversed(NAMES) if name in self.running]
        for running in stopped:
            running.halt(grace=1)
        for running in stopped:
            running.interceptor.flush()
        for running in stopped:
            running.interceptor.close()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def start_backend(
    config: Callable[[str], EnvelopeConfig],
    provider: TracerProvider | None = None,
    *,
    root: str | None = None,
) -> Backend:
    """Start every service; ``config(name)`` gives each server its own
    EnvelopeConfig (sinks and policies may be shared); data movement keeps its
    stores under ``root`` (default: a new temporary directory, removed on stop)."""
    owns_root = root is None
    root = root or tempfile.mkdtemp(prefix="envelope-grpc-stores-")
    os.makedirs(root, exist_ok=True)
    backend = Backend({}, root, owns_root)
    try:
        backend.running["inference"] = start(inference.services(), config("inference"), provider=provider)
        backend.running["deployment"] = start(deployment.services(), config("deployment"), provider=provider)
        backend.running["evaluation"] = start(evaluation.services(), config("evaluation"), provider=provider)
        backend.running["data_movement"] = start(
            data_movement.services(root), config("data_movement"), provider=provider
        )
        downstream = agent.services(backend.address("inference"), tracer_provider=provider)
        backend.running["agent"] = start(downstream, config("agent"), provider=provider)
    except BaseException:
        backend.stop()
        raise
    return backend
