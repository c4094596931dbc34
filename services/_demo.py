"""`envelope-grpc demo`: the example backend on loopback, driven by a
scripted, realistic mix of calls from real clients, then its envelopes as a
table.

Callers authenticate with JWTs signed by a key made for this run; a limits
policy and a Cedar policy decide admission; every envelope goes to a JSON-lines
audit file; spans go to an OTLP backend when OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, Final

import grpc
import jwt
import numpy as np
import tritonclient.grpc as triton

from envelope_grpc import EnvelopeConfig, JsonLinesSink, JwtResolver, Limit, LimitsPolicy, PolicySpec, Sink
from envelope_grpc._table import envelopes as print_table
from envelope_grpc.ledger import ENV_VAR, LedgerError, LedgerSink
from envelope_grpc.v1.envelope_pb2 import (
    DataClassification,
    ExecutionEnvelope,
    ExecutionKind,
    ResourceDimension,
)
from services._backend import Backend, start_backend
from services._runtime import tracer_provider, trusted_loopback
from services.agent.v1 import agent_pb2, agent_pb2_grpc
from services.data_movement.v1 import data_movement_pb2 as dm
from services.data_movement.v1 import data_movement_pb2_grpc as dm_grpc
from services.deployment.v1 import deployment_pb2 as dep
from services.deployment.v1 import deployment_pb2_grpc as dep_grpc
from services.evaluation.v1 import evaluation_pb2 as ev
from services.evaluation.v1 import evaluation_pb2_grpc as ev_grpc

ISSUER: Final = "https://id.example.test"
AUDIENCE: Final = "envelope-grpc-demo"

#: Who calls, with the claims their tokens carry.
CALLERS: Final = {
    "alice": {"tenant": "acme", "project": "search", "roles": ["ml-engineer"]},
    "bob": {"tenant": "globex", "project": "support", "roles": ["analyst"]},
    "ci-runner": {"tenant": "initech", "roles": ["deployer"], "principal_kind": "service"},
}

#: Admission in Cedar: tenants run what they like, but restricted data may
#: only be touched by ml-engineers, and globex may not deploy at all.
CEDAR_POLICIES: Final = """
@id("permit-all-tenants")
permit (principal, action, resource);

@id("restricted-data-needs-ml-engineer")
@reason("restricted data is reserved for ml-engineers")
forbid (principal, action, resource)
when { context.scope.data_classification == "restricted" && !(principal.roles.contains("ml-engineer")) };

@id("globex-may-not-deploy")
@reason("globex has no deployment contract")
forbid (principal, action == EnvelopeGrpc::Action::"deployment", resource)
when { principal.tenant == "globex" };
"""


def token(secret: bytes, subject: str) -> str:
    """A signed JWT for one of the demo callers, valid for ten minutes."""
    now = int(time.time())
    claims = {"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 600}
    return jwt.encode({**claims, **CALLERS[subject]}, secret, algorithm="HS256")


def _policies() -> list[Any]:
    limits = LimitsPolicy(
        [
            Limit(
                ResourceDimension.RESOURCE_DIMENSION_TOKENS, 4096, kind=ExecutionKind.EXECUTION_KIND_INFERENCE
            ),
            Limit(ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT, 16, deny=True),
        ]
    )
    from envelope_grpc.cedar import CedarPolicy

    return [limits, PolicySpec(CedarPolicy(CEDAR_POLICIES), budget=0.5)]


class _Collect:
    """Keeps the envelopes in memory for the table."""

    def __init__(self) -> None:
        self.envelopes: list[ExecutionEnvelope] = []
        self._lock = threading.Lock()

    def write(self, envelopes: Sequence[ExecutionEnvelope], /) -> None:
        with self._lock:
            self.envelopes.extend(envelopes)

    def close(self) -> None:
        pass


class Traffic:
    """The scripted mix, each call made as one of the demo callers."""

    def __init__(self, backend: Backend, secret: bytes) -> None:
        self.backend = backend
        self.secret = secret
        self.channels: list[grpc.Channel] = []

    def _metadata(self, caller: str | None) -> tuple[tuple[str, str], ...]:
        if caller is None:
            return ()
        return (("authorization", f"Bearer {token(self.secret, caller)}"),)

    def _stub(self, name: str, factory: Callable[[grpc.Channel], Any]) -> Any:
        channel = grpc.insecure_channel(self.backend.address(name))
        self.channels.append(channel)
        return factory(channel)

    def run(self) -> None:
        """Make every call; refusals are part of the script."""
        steps: list[Callable[[], object]] = [
            self.deployments,
            self.inferences,
            self.evaluation,
            self.data,
            self.agent,
        ]
        try:
            for step in steps:
                step()
        finally:
            for channel in self.channels:
                channel.close()

    def _call(self, caller: str | None, method: Callable[..., Any], request: Any) -> Any:
        try:
            result = method(request, metadata=self._metadata(caller))
            return list(result) if isinstance(result, Iterator) else result
        except grpc.RpcError:
            return None  # the envelope records why

    def deployments(self) -> None:
        stub = self._stub("deployment", dep_grpc.DeploymentServiceStub)
        asks = [
            ("alice", dict(model_id="llama-3-8b", accelerator_count=2, max_replicas=1, location="us-east")),
            ("alice", dict(model_id="llama-3-70b", accelerator_count=4, max_replicas=3, location="eu-west")),
            ("ci-runner", dict(model_id="mixtral-8x7b", accelerator_type="amd-mi300", accelerator_count=2)),
            ("ci-runner", dict(model_id="llama-3-405b", accelerator_count=32, location="eu-west")),
            ("bob", dict(model_id="support-bot", accelerator_count=1, location="us-east")),
        ]
        for caller, fields in asks:
            request = dep.DeployModelRequest(engine="vllm", version="1", **fields)  # type: ignore[arg-type]
            self._call(caller, stub.DeployModel, request)

    def inferences(self) -> None:
        address = self.backend.address("inference")
        with triton.InferenceServerClient(address) as client:
            features = triton.InferInput("features", [3, 4], "FP32")
            features.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]] * 3, dtype=np.float32))
            self._infer(client, "alice", "iris-classifier", [features])
            prompt = triton.InferInput("prompt", [1], "BYTES")
            prompt.set_data_from_numpy(np.array([b"tell me about envelopes"], dtype=np.object_))
            for caller, tokens in (("bob", 128), ("bob", 20000)):
                self._infer(client, caller, "tiny-lm", [prompt], max_tokens=tokens)

    def _infer(self, client: Any, caller: str, model: str, inputs: list[Any], **parameters: int) -> None:
        headers = dict(self._metadata(caller))
        with contextlib.suppress(triton.InferenceServerException):  # the envelope records why
            client.infer(model, inputs, headers=headers, parameters=parameters or None)

    def evaluation(self) -> None:
        stub = self._stub("evaluation", ev_grpc.EvaluationServiceStub)
        request = ev.EvaluateModelRequest(
            model="iris-linear", dataset="iris-like", metrics=["accuracy", "f1"], batch_size=32, tenant="acme"
        )
        self._call("alice", stub.EvaluateModel, request)

    def data(self) -> None:
        stub = self._stub("data_movement", dm_grpc.DataMovementServiceStub)
        payload = os.urandom(3 << 20)
        header = dm.UploadHeader(
            source="laptop:/tmp/weights.bin",
            store="lake-eu",
            path="runs/demo/weights.bin",
            size_bytes=len(payload),
            data_classification=DataClassification.DATA_CLASSIFICATION_RESTRICTED,
            region="eu-west-1",
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        chunks = [payload[i : i + (1 << 20)] for i in range(0, len(payload), 1 << 20)]

        def upload() -> Iterator[dm.UploadRequest]:
            yield dm.UploadRequest(header=header)
            yield from (dm.UploadRequest(chunk=chunk) for chunk in chunks)

        self._call("alice", stub.Upload, upload())
        self._call("bob", stub.Upload, upload())  # restricted data: Cedar forbids bob
        download = dm.DownloadRequest(
            store="lake-eu",
            path="runs/demo/weights.bin",
            region="eu-west-1",
            data_classification=DataClassification.DATA_CLASSIFICATION_RESTRICTED,
        )
        self._call("alice", stub.Download, download)

    def agent(self) -> None:
        stub = self._stub("agent", agent_pb2_grpc.AgentServiceStub)
        request = agent_pb2.RunWorkflowRequest(
            workflow="research",
            goal="summarize what the envelopes of this backend show",
            fan_out=3,
            budget=agent_pb2.Budget(max_tokens=600, max_tool_calls=4),
        )
        self._call("alice", stub.RunWorkflow, request)


def ledger_url(audit_path: str, ledger: str | None = None) -> str:
    """The demo's ledger: ``ledger``, else $ENVELOPE_GRPC_LEDGER, else
    envelopes.db next to the audit file."""
    beside = os.path.join(os.path.dirname(audit_path), "envelopes.db")
    return ledger or os.environ.get(ENV_VAR) or f"sqlite:///{beside}"


def run(audit_path: str, out: IO[str] = sys.stdout, *, ledger: str | None = None) -> int:
    """Start the backend, drive the traffic, print the envelopes; an exit status."""
    secret = os.urandom(32)
    resolver = JwtResolver(keys=secret, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE)
    collected = _Collect()
    audit = JsonLinesSink(audit_path)
    url = ledger_url(audit_path, ledger)
    try:
        # One sink for every server: admitted envelopes are committed before their handlers run.
        recorder = LedgerSink(url)
    except LedgerError:
        audit.close()
        raise
    sinks: list[Sink] = [audit, recorder, collected]
    policies = _policies()

    def config(name: str) -> EnvelopeConfig:
        return EnvelopeConfig(
            resolvers=[resolver], policies=policies, sinks=sinks, trust_peer=trusted_loopback
        )

    provider = tracer_provider("envelope-grpc-demo")
    try:
        backend = start_backend(config, provider)
        try:
            Traffic(backend, secret).run()
        finally:
            backend.stop()  # every server's queue is written before the shared sinks close
    finally:  # also when a server cannot start; closing twice is harmless
        recorder.close()
        audit.close()
        provider.shutdown()
    ordered = sorted(collected.envelopes, key=lambda env: env.lifecycle.start_time.ToNanoseconds())
    print_table(ordered, out)
    out.write(f"\n{len(ordered)} envelopes written to {audit_path} and the ledger {recorder.url}\n")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        out.write(f"spans exported to {os.environ['OTEL_EXPORTER_OTLP_ENDPOINT']}\n")
    return 0
