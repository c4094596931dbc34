"""The deployment service: its placement engine on its own, then the real
service on 127.0.0.1 with the envelope interceptors, checked envelope by
envelope, and `python -m services.deployment` as a process."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from envelope_grpc import CallInfo, EnvelopeConfig, Limit, LimitsPolicy
from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    Binding,
    DataClassification,
    Decision,
    DecisionOutcome,
    EnforcementMode,
    ExecutionEnvelope,
    ExecutionKind,
    Grant,
    GrantStage,
    LifecycleState,
    Outcome,
    PolicyVerdict,
    Principal,
    PrincipalKind,
    ResourceDimension,
    Resources,
    Scope,
    Target,
    Transition,
    Usage,
)
from services import _runtime
from services.deployment import SERVICE_NAME, DeploymentServicer, configured_inventory, services
from services.deployment.placement import (
    DEFAULT_INVENTORY,
    Adjustment,
    Ask,
    Inventory,
    Node,
    PlacementEngine,
    PlacementError,
    Quantities,
    Refusal,
    host_memory_bytes,
    model_parameters_billions,
    summarize,
)
from services.deployment.v1 import deployment_pb2 as pb
from services.deployment.v1 import deployment_pb2_grpc as pb_grpc
from tests.conftest import error_info, refused
from tests.services import conftest
from tests.services._python_m import python_m, stop_with_sigterm

GiB = 1 << 30
ROOT = pathlib.Path(__file__).resolve().parents[2]
METHOD = "/services.deployment.v1.DeploymentService/"
MessageT = TypeVar("MessageT", bound=Message)

# -- the placement engine, pure ----------------------------------------------------------


def a100(**quantities: Any) -> Ask:
    """An ask for llama-3-8b on A100s in us-east."""
    return Ask(
        "llama-3-8b",
        Quantities(accelerator_type="nvidia-a100", **quantities),
        engine="vllm",
        region="us-east",
    )


FULL: dict[str, Any] = {"accelerator_memory_bytes": 80 * GiB, "memory_bytes": 64 * GiB}


def test_engine_grants_as_asked_and_binds_the_lowest_free_accelerators() -> None:
    engine = PlacementEngine()
    ask = a100(accelerator_count=1, replicas_min=1, replicas_start=1, replicas_max=2, concurrency=8, **FULL)
    placed = engine.place("d1", ask)
    assert placed.granted == ask.resources
    assert placed.adjustments == ()
    assert (placed.node.name, placed.accelerator_indexes, placed.endpoint) == (
        "gpu-a100-0",
        (0, 1),
        "10.0.1.10:8000",
    )
    second = engine.place("d2", a100(accelerator_count=1, replicas_min=1, replicas_start=1, replicas_max=1))
    assert (second.accelerator_indexes, second.port) == ((2,), 8001)
    assert engine.free_accelerators("gpu-a100-0") == (3,)
    assert engine.free_memory_bytes("gpu-a100-0") == (512 - 2 * 64 - 32) * GiB
    assert engine.allocations() == {"d1": ("gpu-a100-0", (0, 1)), "d2": ("gpu-a100-0", (2,))}


def test_engine_narrows_replicas_to_free_capacity_when_the_minimum_fits() -> None:
    engine = PlacementEngine()
    placed = engine.place(
        "d1", a100(accelerator_count=2, replicas_min=1, replicas_start=3, replicas_max=4, **FULL)
    )
    assert placed.granted == Quantities(
        accelerator_count=2,
        accelerator_type="nvidia-a100",
        replicas_min=1,
        replicas_start=2,
        replicas_max=2,
        **FULL,
    )
    assert placed.adjustments == (
        Adjustment(
            "REPLICAS_NARROWED",
            "capacity for 2 of 4 replicas on gpu-a100-0: max_replicas 4 -> 2, starting_replicas 3 -> 2",
        ),
    )
    assert placed.accelerator_indexes == (0, 1, 2, 3)


def test_engine_rejects_when_the_minimum_does_not_fit_and_release_frees() -> None:
    engine = PlacementEngine()
    engine.place("d1", a100(accelerator_count=3, replicas_min=1, replicas_start=1, replicas_max=1, **FULL))
    with pytest.raises(PlacementError) as refused:
        engine.place(
            "d2", a100(accelerator_count=1, replicas_min=2, replicas_start=2, replicas_max=2, **FULL)
        )
    assert (refused.value.refusal, refused.value.reason_code) == (Refusal.EXHAUSTED, "INSUFFICIENT_CAPACITY")
    assert "room for 1 replica(s) on gpu-a100-0, at least 2 needed" in refused.value.message
    assert engine.release("d1") is True
    assert engine.release("d1") is False
    assert engine.place(
        "d2", a100(accelerator_count=1, replicas_min=2, replicas_max=2, **FULL)
    ).accelerator_indexes == (
        0,
        1,
    )


def test_engine_rejects_a_replica_larger_than_any_node() -> None:
    with pytest.raises(PlacementError) as refused:
        PlacementEngine().place("d1", a100(accelerator_count=8))
    assert refused.value.reason_code == "INSUFFICIENT_CAPACITY"
    assert refused.value.message == (
        "no node can hold one replica: gpu-a100-0 cannot: 8 accelerators per replica, it has 4"
    )


def test_engine_fills_in_memory_replicas_and_type() -> None:
    placed = PlacementEngine().place(
        "d1", Ask("llama-3-8b", Quantities(accelerator_count=1), region="us-east")
    )
    assert placed.granted == Quantities(
        accelerator_count=1,
        accelerator_type="nvidia-a100",
        accelerator_memory_bytes=80 * GiB,
        memory_bytes=32 * GiB,
        replicas_min=1,
        replicas_start=1,
        replicas_max=1,
    )
    assert [a.reason_code for a in placed.adjustments] == [
        "MEMORY_COMPUTED",
        "MEMORY_COMPUTED",
        "DEFAULTS_APPLIED",
        "DEFAULTS_APPLIED",
    ]
    assert placed.engine == "vllm"
    assert summarize(placed.adjustments)[0] == "PLACEMENT_ADJUSTED"


def test_engine_computes_the_accelerator_count_from_asked_memory() -> None:
    placed = PlacementEngine().place(
        "d1", a100(accelerator_memory_bytes=150 * GiB, memory_bytes=8 * GiB, replicas_min=1, replicas_max=1)
    )
    assert (placed.granted.accelerator_count, placed.accelerator_indexes) == (2, (0, 1))
    assert (
        Adjustment("DEFAULTS_APPLIED", "2 accelerator(s) per replica to hold 150 GiB") in placed.adjustments
    )


def test_engine_refuses_memory_the_asked_accelerators_cannot_hold() -> None:
    with pytest.raises(PlacementError) as refused:
        PlacementEngine().place("d1", a100(accelerator_count=1, accelerator_memory_bytes=100 * GiB))
    assert refused.value.reason_code == "INSUFFICIENT_CAPACITY"
    assert "100 GiB of accelerator memory per replica, 1 x nvidia-a100 hold 80 GiB" in refused.value.message


def test_engine_prefers_the_first_node_with_room_for_every_replica() -> None:
    # No region: the A100 node cannot hold 2 x 4 accelerators, the H100 node can.
    placed = PlacementEngine().place("d1", Ask("m", Quantities(accelerator_count=4, replicas_max=2, **FULL)))
    assert (placed.node.name, placed.accelerator_indexes) == ("gpu-h100-0", tuple(range(8)))
    assert placed.granted.accelerator_type == "nvidia-h100"


@pytest.mark.parametrize(
    ("ask", "refusal", "code"),
    [
        (Ask("m", region="ap-south"), Refusal.PRECONDITION, "REGION_UNAVAILABLE"),
        (
            Ask("m", Quantities(accelerator_type="nvidia-h100"), region="us-east"),
            Refusal.PRECONDITION,
            "VENDOR_MISMATCH",
        ),
        (Ask("m", force_cpu=True, region="eu-west"), Refusal.PRECONDITION, "VENDOR_MISMATCH"),
        (Ask("m", Quantities(replicas_min=3, replicas_max=1)), Refusal.INVALID, "INVALID_REPLICAS"),
        (Ask("m", Quantities(replicas_start=5, replicas_max=2)), Refusal.INVALID, "INVALID_REPLICAS"),
        (Ask("m", Quantities(replicas_min=2, replicas_start=1)), Refusal.INVALID, "INVALID_REPLICAS"),
        (Ask("m", Quantities(replicas_min=-1)), Refusal.INVALID, "INVALID_REPLICAS"),
        (Ask("m", Quantities(replicas_max=0)), Refusal.INVALID, "INVALID_REPLICAS"),
        (Ask("m", Quantities(accelerator_count=1), force_cpu=True), Refusal.INVALID, "INVALID_ACCELERATORS"),
        (Ask("m", Quantities(accelerator_count=-2)), Refusal.INVALID, "INVALID_ACCELERATORS"),
        (Ask("m", Quantities(concurrency=0)), Refusal.INVALID, "INVALID_REQUEST"),
        (
            Ask("m", Quantities(memory_bytes=0, replicas_max=10**15), force_cpu=True),
            Refusal.INVALID,
            "INVALID_REQUEST",
        ),
        (Ask("m", Quantities(duration_ms=0)), Refusal.INVALID, "INVALID_REQUEST"),
        (Ask("m", port=70000), Refusal.INVALID, "INVALID_REQUEST"),
        (Ask(""), Refusal.INVALID, "INVALID_REQUEST"),
    ],
)
def test_engine_refusals(ask: Ask, refusal: Refusal, code: str) -> None:
    engine = PlacementEngine()
    with pytest.raises(PlacementError) as refused:
        engine.place("d1", ask)
    assert (refused.value.refusal, refused.value.reason_code) == (refusal, code)
    assert engine.allocations() == {}


def test_engine_force_cpu_places_on_a_cpu_only_node() -> None:
    placed = PlacementEngine().place(
        "d1",
        Ask("mixtral-8x7b", Quantities(replicas_min=1, replicas_max=1), engine="llama.cpp", force_cpu=True),
    )
    assert (placed.node.name, placed.accelerator_indexes, placed.endpoint) == ("cpu-0", (), "10.0.1.20:8000")
    assert placed.granted == Quantities(
        memory_bytes=224 * GiB, replicas_min=1, replicas_start=1, replicas_max=1
    )  # 2 x 112 GiB of bf16 weights for 8 x 7B parameters
    assert placed.adjustments == (
        Adjustment(
            "MEMORY_COMPUTED",
            "host memory 224 GiB per replica (2 x 112 GiB of bf16 weights for 56B parameters)",
        ),
        Adjustment("DEFAULTS_APPLIED", "replicas defaulted: starting_replicas 1"),
    )


def test_engine_stays_within_a_ceiling() -> None:
    engine = PlacementEngine()
    ceiling = Quantities(
        accelerator_count=2, accelerator_type="nvidia-a100", replicas_min=1, replicas_start=4, replicas_max=2
    )
    placed = engine.place(
        "d1", a100(accelerator_count=4, replicas_min=1, replicas_start=4, replicas_max=8, **FULL), ceiling
    )
    assert placed.granted == Quantities(
        accelerator_count=2,
        accelerator_type="nvidia-a100",
        replicas_min=1,
        replicas_start=2,
        replicas_max=2,
        **FULL,
    )
    assert placed.adjustments == (
        Adjustment("REPLICAS_NARROWED", "clamped to the granted max_replicas: starting_replicas 4 -> 2"),
    )
    # A ceiling on a dimension the caller left unset caps what is filled in.
    capped = engine.place(
        "d2", Ask("llama-3-8b", Quantities(replicas_max=1), region="eu-west"), Quantities(memory_bytes=GiB)
    )
    assert capped.granted.memory_bytes == GiB


def test_engine_ports() -> None:
    engine = PlacementEngine()
    engine.place("d1", Ask("m", Quantities(memory_bytes=GiB), region="us-east", force_cpu=True, port=9000))
    with pytest.raises(PlacementError) as refused:
        engine.place(
            "d2", Ask("m", Quantities(memory_bytes=GiB), region="us-east", force_cpu=True, port=9000)
        )
    assert (refused.value.refusal, refused.value.reason_code) == (Refusal.PRECONDITION, "PORT_IN_USE")
    assert engine.place("d3", Ask("m", Quantities(memory_bytes=GiB), force_cpu=True)).port == 8000


def test_host_memory_sizing() -> None:
    assert model_parameters_billions("llama-3-8b") == 8
    assert model_parameters_billions("Llama-3.1-70B-Instruct") == 70
    assert model_parameters_billions("mixtral-8x7b") == 56
    assert model_parameters_billions("qwen2-0.5b") == 0.5
    assert model_parameters_billions("bert-base") is None
    assert host_memory_bytes("llama-3-8b", "vllm") == (
        32 * GiB,
        "2 x 16 GiB of bf16 weights for 8B parameters",
    )
    assert host_memory_bytes("bert-base", "triton") == (16 * GiB, "the triton default of 16 GiB")
    assert host_memory_bytes("bert-base", "custom") == (16 * GiB, "the custom default of 16 GiB")


def test_inventory_from_json(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inventory.json"
    nodes = [
        {"name": "n1", "region": "r1", "endpoint_host": "h1", "host_memory_gib": 64},
        {
            "name": "n2",
            "region": "r2",
            "endpoint_host": "h2",
            "host_memory_gib": 128,
            "accelerator_vendor": "amd",
            "accelerator_type": "amd-mi300x",
            "accelerator_count": 8,
            "accelerator_memory_gib": 192,
        },
    ]
    path.write_text(json.dumps({"nodes": nodes}))
    inventory = Inventory.load(path)
    assert inventory.regions == ("r1", "r2")
    assert inventory.node("n2").accelerator_type == "amd-mi300x"
    monkeypatch.setenv("ENVELOPE_GRPC_DEPLOYMENT_INVENTORY", str(path))
    assert configured_inventory() == inventory
    monkeypatch.delenv("ENVELOPE_GRPC_DEPLOYMENT_INVENTORY")
    assert configured_inventory() == DEFAULT_INVENTORY
    with pytest.raises(ValueError, match="unique"):
        Inventory((Node("n", "r", "h", 1), Node("n", "r", "h", 1)))
    with pytest.raises(ValueError, match="type and memory"):
        Node("n", "r", "h", 1, accelerator_count=2)
    with pytest.raises(ValueError, match="unknown node fields"):
        Inventory.from_mapping({"nodes": [{"name": "n", "gpus": 2}]})


def test_summarize() -> None:
    narrowed = Adjustment("REPLICAS_NARROWED", "max 4 -> 2")
    computed = Adjustment("MEMORY_COMPUTED", "host memory 32 GiB")
    assert summarize([narrowed]) == ("REPLICAS_NARROWED", "max 4 -> 2")
    assert summarize([computed, computed]) == ("MEMORY_COMPUTED", "host memory 32 GiB; host memory 32 GiB")
    assert summarize([narrowed], [computed]) == ("PLACEMENT_ADJUSTED", "host memory 32 GiB; max 4 -> 2")


# -- the service, on a real server ----------------------------------------------------------


class Server(conftest.Served):
    """The deployment service on 127.0.0.1:0 with the envelope interceptors."""

    def __init__(
        self, service_list: Sequence[_runtime.Service], policies: Sequence[Any], resolvers: Sequence[Any]
    ) -> None:
        config = EnvelopeConfig(policies=policies, resolvers=resolvers, trust_peer=_runtime.trusted_loopback)
        super().__init__(service_list, config)
        self.stub = pb_grpc.DeploymentServiceStub(self.channel)


@pytest.fixture
def serve(servers: conftest.Servers) -> Callable[..., Server]:
    """serve(policies=..., resolvers=..., service_list=...) starts a server;
    all stop at the end."""

    def start(
        *,
        policies: Sequence[Any] = (),
        resolvers: Sequence[Any] = (),
        service_list: Sequence[_runtime.Service] | None = None,
    ) -> Server:
        service_list = service_list if service_list is not None else services()
        return servers(Server, service_list, policies, resolvers)

    return start


@pytest.fixture
def server(serve: Callable[..., Server]) -> Server:
    return serve()


def deploy_request(**fields: Any) -> pb.DeployModelRequest:
    """A fully specified deploy of llama-3-8b on A100s in us-east; ``fields``
    override (None clears a field)."""
    request = pb.DeployModelRequest(
        model_id="llama-3-8b",
        version="v1",
        config_id="cfg-serving-1",
        weights_file="s3://models/llama-3-8b/model.safetensors",
        engine="vllm",
        container_image="registry.local/vllm-openai:0.6.3",
        min_replicas=1,
        starting_replicas=1,
        max_replicas=2,
        autoscaling=pb.Autoscaling(enabled=True, target_concurrency=16),
        concurrency_per_replica=16,
        location="us-east",
        lb_port=8080,
        accelerator_count=2,
        accelerator_type="nvidia-a100",
        accelerator_memory_gib=160,
        memory_gib=64,
        lifetime_seconds=3600,
        tenant="acme",
        project="search",
        data_classification="confidential",
    )
    for name, value in fields.items():
        if value is None:
            request.ClearField(name)  # type: ignore[arg-type]
        elif name == "autoscaling":
            request.autoscaling.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def copy_of(message: MessageT) -> MessageT:
    """A copy of ``message``, to change without changing the original."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


#: The requested resources of deploy_request() as the envelope records them.
ASKED = Resources(
    accelerator_count=2,
    accelerator_type="nvidia-a100",
    accelerator_memory_bytes=160 * GiB,
    memory_bytes=64 * GiB,
    replicas_min=1,
    replicas_start=1,
    replicas_max=2,
    concurrency=16,
    duration_ms=3_600_000,
)
#: The target of deploy_request().
TARGET = Target(
    type="model",
    name="llama-3-8b",
    version="v1",
    attributes={
        "config_id": "cfg-serving-1",
        "weights": "s3://models/llama-3-8b/model.safetensors",
        "engine": "vllm",
        "container": "registry.local/vllm-openai:0.6.3",
        "autoscaling": "true",
        "autoscaling_target_concurrency": "16",
        "lb_port": "8080",
    },
)
SCOPE = Scope(region="us-east", data_classification=DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL)

S = LifecycleState
OUT = DecisionOutcome
RECEIVED = (S.LIFECYCLE_STATE_RECEIVED, "receiver", "")
NORMALIZED = (S.LIFECYCLE_STATE_NORMALIZED, "extractor", "")


def steps(*moves: tuple[int, str, str]) -> list[Transition]:
    """Transitions through ``moves`` (state, actor, reason), from UNSPECIFIED."""
    found = []
    before = S.LIFECYCLE_STATE_UNSPECIFIED
    for to, actor, reason in moves:
        step = Transition(to=to, actor=actor, reason=reason)  # type: ignore[arg-type]
        step.__setattr__("from", before)
        found.append(step)
        before = to  # type: ignore[assignment]
    return found


def stable(env: ExecutionEnvelope) -> str:
    """``env`` without what differs from run to run (ids, times, addresses,
    durations and the response size), as text for readable differences."""
    copy = copy_of(env)
    for name in ("envelope_id", "request_id", "trace_id", "span_id"):
        copy.ClearField(name)
    copy.principal.ClearField("source_address")
    copy.principal.ClearField("user_agent")
    copy.execution.ClearField("deadline")
    copy.decision.ClearField("time")
    for verdict in copy.decision.policies:
        verdict.ClearField("duration_us")
    for grant in copy.grants:
        grant.ClearField("time")
    copy.lifecycle.ClearField("start_time")
    copy.lifecycle.ClearField("end_time")
    for step in copy.lifecycle.transitions:
        step.ClearField("time")
    if copy.outcome.HasField("usage"):
        copy.outcome.usage.ClearField("duration_ms")
        copy.outcome.usage.ClearField("response_bytes")
    return text_format.MessageToString(copy)


def envelope(
    method: str,
    request: Any,
    *,
    kind: int,
    target: Target,
    moves: Sequence[tuple[int, str, str]],
    scope: Scope | None = None,
    tenant: str = "",
    project: str = "",
    requested: Resources | None = None,
    decision: Decision | None = None,
    grants: Sequence[Grant] = (),
    binding: Binding | None = None,
    outcome: Outcome | None = None,
) -> str:
    """The stable part of the envelope a call should produce, as text."""
    env = ExecutionEnvelope(schema_version="1.0")
    env.principal.kind = PrincipalKind.PRINCIPAL_KIND_ANONYMOUS
    env.principal.auth_method = AuthMethod.AUTH_METHOD_NONE
    env.principal.tenant = tenant
    env.principal.project = project
    env.execution.kind = kind  # type: ignore[assignment]
    env.execution.method = METHOD + method
    env.execution.target.CopyFrom(target)
    if request.ByteSize():  # an empty request is not digested
        env.execution.request_digest = "sha256:" + hashlib.sha256(request.SerializeToString()).hexdigest()
    if scope is not None:
        env.scope.CopyFrom(scope)
    if requested is not None:
        env.requested.CopyFrom(requested)
    env.decision.CopyFrom(
        decision
        or Decision(outcome=OUT.DECISION_OUTCOME_ADMITTED, mode=EnforcementMode.ENFORCEMENT_MODE_ENFORCE)
    )
    env.grants.extend(grants)
    if binding is not None:
        env.binding.CopyFrom(binding)
    env.lifecycle.state = moves[-1][0]  # type: ignore[assignment]
    env.lifecycle.transitions.extend(steps(*moves))
    if outcome is not None:
        env.outcome.CopyFrom(outcome)
    return text_format.MessageToString(env)


def _grant(
    stage: Any,
    actor: str,
    resources: Resources,
    outcome: Any = OUT.DECISION_OUTCOME_ADMITTED,
    reason_code: str = "",
    reason: str = "",
) -> Grant:
    return Grant(
        stage=stage,
        resources=resources,
        outcome=outcome,
        actor=actor,
        reason_code=reason_code,
        reason=reason,
    )


def admission_grant(resources: Resources, *args: Any, **kwargs: Any) -> Grant:
    """The admission stage's grant: ``_grant``'s outcome, reason_code and reason."""
    return _grant(GrantStage.GRANT_STAGE_ADMISSION, "admission", resources, *args, **kwargs)


def backend_grant(resources: Resources, *args: Any, **kwargs: Any) -> Grant:
    """The backend stage's grant: ``_grant``'s outcome, reason_code and reason."""
    return _grant(GrantStage.GRANT_STAGE_BACKEND, "backend", resources, *args, **kwargs)


def deployed(request: Any, *, target: Target = TARGET, scope: Scope = SCOPE, **fields: Any) -> str:
    """The stable envelope of a DeployModel call by tenant acme, project search."""
    return envelope(
        "DeployModel",
        request,
        kind=ExecutionKind.EXECUTION_KIND_DEPLOYMENT,
        target=target,
        scope=scope,
        tenant="acme",
        project="search",
        **fields,
    )


def completed(request: Any, *, replicas_started: int | None = None) -> Outcome:
    usage = Usage(request_messages=1, response_messages=1, request_bytes=request.ByteSize())
    if replicas_started is not None:
        usage.replicas_started = replicas_started
    return Outcome(status_code=0, usage=usage)


def deploy_moves(grant_reason: str = "") -> list[tuple[int, str, str]]:
    return [
        RECEIVED,
        NORMALIZED,
        (S.LIFECYCLE_STATE_ADMITTED, "admission", ""),
        (S.LIFECYCLE_STATE_GRANTED, "backend", grant_reason),
        (S.LIFECYCLE_STATE_BOUND, "backend", ""),
        (S.LIFECYCLE_STATE_COMPLETED, "completion", ""),
    ]


def binding(deployment: pb.Deployment, indexes: Sequence[int], *, port: int = 8080) -> Binding:
    return Binding(
        node="gpu-a100-0",
        accelerator_indexes=indexes,
        runtime="vllm",
        endpoint=f"10.0.1.10:{port}",
        region="us-east",
        attributes={
            "deployment_id": deployment.deployment_id,
            "replicas_max": str(deployment.max_replicas),
            "lb_port": str(port),
        },
    )


def test_deploy_granted_as_asked_is_bound_to_node_accelerators_and_endpoint(server: Server) -> None:
    request = deploy_request()
    response, call = server.stub.DeployModel.with_call(request, timeout=10)
    deployment = response.deployment
    [env] = server.envelopes(1)
    assert re.fullmatch(r"dep-[0-9a-f]{12}", deployment.deployment_id)
    assert deployment == pb.Deployment(
        deployment_id=deployment.deployment_id,
        state=pb.DeploymentState.DEPLOYMENT_STATE_RUNNING,
        model_id="llama-3-8b",
        version="v1",
        engine="vllm",
        tenant="acme",
        project="search",
        region="us-east",
        node="gpu-a100-0",
        accelerator_indexes=[0, 1, 2, 3],
        accelerator_type="nvidia-a100",
        accelerator_count=2,
        accelerator_memory_gib=160,
        memory_gib=64,
        min_replicas=1,
        starting_replicas=1,
        max_replicas=2,
        endpoint="10.0.1.10:8080",
        lifetime_seconds=3600,
        envelope_id=env.envelope_id,
    )
    assert dict(call.trailing_metadata())["x-execution-envelope-id"] == env.envelope_id
    assert stable(env) == deployed(
        request,
        requested=ASKED,
        grants=[admission_grant(ASKED), backend_grant(ASKED)],
        binding=binding(deployment, [0, 1, 2, 3]),
        moves=deploy_moves(),
        outcome=completed(request, replicas_started=1),
    )


def test_deploy_narrowed_to_free_capacity(server: Server) -> None:
    request = deploy_request(starting_replicas=3, max_replicas=4, autoscaling=pb.Autoscaling(enabled=False))
    deployment = server.stub.DeployModel(request, timeout=10).deployment
    [env] = server.envelopes(1)
    asked = copy_of(ASKED)
    asked.replicas_start, asked.replicas_max = 3, 4
    granted = copy_of(ASKED)
    granted.replicas_start = granted.replicas_max = 2
    reason = "capacity for 2 of 4 replicas on gpu-a100-0: max_replicas 4 -> 2, starting_replicas 3 -> 2"
    assert (deployment.starting_replicas, deployment.max_replicas, deployment.grant_reason) == (2, 2, reason)
    target = copy_of(TARGET)
    del target.attributes["autoscaling"]
    del target.attributes["autoscaling_target_concurrency"]
    assert stable(env) == deployed(
        request,
        target=target,
        requested=asked,
        grants=[
            admission_grant(asked),
            backend_grant(
                granted, OUT.DECISION_OUTCOME_NARROWED, reason_code="REPLICAS_NARROWED", reason=reason
            ),
        ],
        binding=binding(deployment, [0, 1, 2, 3]),
        moves=deploy_moves("REPLICAS_NARROWED"),
        outcome=completed(request, replicas_started=2),
    )


def test_deploy_memory_filled_in_is_widened_with_a_reason(server: Server) -> None:
    request = deploy_request(
        accelerator_count=1, max_replicas=1, accelerator_memory_gib=None, memory_gib=None, lb_port=None
    )
    deployment = server.stub.DeployModel(request, timeout=10).deployment
    [env] = server.envelopes(1)
    asked = copy_of(ASKED)
    asked.accelerator_count = asked.replicas_max = 1
    asked.ClearField("accelerator_memory_bytes")
    asked.ClearField("memory_bytes")
    granted = copy_of(asked)
    granted.accelerator_memory_bytes = 80 * GiB
    granted.memory_bytes = 32 * GiB
    reason = (
        "accelerator memory 80 GiB per replica (1 x nvidia-a100 of 80 GiB); "
        "host memory 32 GiB per replica (2 x 16 GiB of bf16 weights for 8B parameters)"
    )
    assert (deployment.accelerator_memory_gib, deployment.memory_gib, deployment.endpoint) == (
        80,
        32,
        "10.0.1.10:8000",
    )
    target = copy_of(TARGET)
    del target.attributes["lb_port"]
    assert stable(env) == deployed(
        request,
        target=target,
        requested=asked,
        grants=[
            admission_grant(asked),
            backend_grant(
                granted, OUT.DECISION_OUTCOME_WIDENED, reason_code="MEMORY_COMPUTED", reason=reason
            ),
        ],
        binding=binding(deployment, [0], port=8000),
        moves=deploy_moves("MEMORY_COMPUTED"),
        outcome=completed(request, replicas_started=1),
    )


def test_deploy_narrowed_and_filled_in_is_adjusted_under_one_reason_code(server: Server) -> None:
    request = deploy_request(max_replicas=3, accelerator_memory_gib=None)
    server.stub.DeployModel(request, timeout=10)
    [env] = server.envelopes(1)
    backend = env.grants[1]
    assert (backend.outcome, backend.reason_code) == (OUT.DECISION_OUTCOME_ADJUSTED, "PLACEMENT_ADJUSTED")
    assert backend.reason == (
        "accelerator memory 160 GiB per replica (2 x nvidia-a100 of 80 GiB); "
        "capacity for 2 of 3 replicas on gpu-a100-0: max_replicas 3 -> 2"
    )
    assert (backend.resources.replicas_max, backend.resources.accelerator_memory_bytes) == (2, 160 * GiB)
    assert [t.to for t in env.lifecycle.transitions][-3:] == [
        S.LIFECYCLE_STATE_GRANTED,
        S.LIFECYCLE_STATE_BOUND,
        S.LIFECYCLE_STATE_COMPLETED,
    ]


def rejected_moves(reason_code: str) -> list[tuple[int, str, str]]:
    return [
        RECEIVED,
        NORMALIZED,
        (S.LIFECYCLE_STATE_ADMITTED, "admission", ""),
        (S.LIFECYCLE_STATE_REJECTED, "backend", reason_code),
    ]


@pytest.mark.parametrize(
    ("fields", "code", "reason_code", "message"),
    [
        (
            {"accelerator_type": "nvidia-h100"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "VENDOR_MISMATCH",
            "no nvidia-h100 nodes in region us-east (accelerators there: nvidia-a100)",
        ),
        (
            {"location": "ap-south"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGION_UNAVAILABLE",
            "no node in region ap-south (regions: us-east, eu-west)",
        ),
        (
            {"min_replicas": 3},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REPLICAS",
            "min_replicas (3) exceeds starting_replicas (1)",
        ),
        (
            {"accelerator_count": 8},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "INSUFFICIENT_CAPACITY",
            "no node can hold one replica: gpu-a100-0 cannot: 8 accelerators per replica, it has 4",
        ),
    ],
)
def test_deploy_rejected_by_placement(
    server: Server, fields: dict[str, Any], code: grpc.StatusCode, reason_code: str, message: str
) -> None:
    request = deploy_request(**fields)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.DeployModel(request, timeout=10)
    error = caught.value
    assert (error.code(), error.details()) == (code, message)
    [env] = server.envelopes(1)
    info = error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        reason_code,
        "envelope-grpc",
        {"envelope_id": env.envelope_id},
    )
    asked = copy_of(ASKED)
    scope = copy_of(SCOPE)
    for name, value in fields.items():
        if name == "accelerator_type":
            asked.accelerator_type = value
        elif name == "accelerator_count":
            asked.accelerator_count = value
        elif name == "min_replicas":
            asked.replicas_min = value
        elif name == "location":
            scope.region = value
    assert stable(env) == deployed(
        request,
        scope=scope,
        requested=asked,
        grants=[admission_grant(asked)],
        moves=rejected_moves(reason_code),
        outcome=Outcome(status_code=code.value[0], status_message=message, reason_code=reason_code),
    )


def test_insufficient_capacity_until_a_stop_frees_accelerators(server: Server) -> None:
    first = server.stub.DeployModel(deploy_request(), timeout=10).deployment
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.DeployModel(deploy_request(max_replicas=1, lb_port=8081), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "INSUFFICIENT_CAPACITY"
    stopped = server.stub.StopDeployment(
        pb.StopDeploymentRequest(deployment_id=first.deployment_id), timeout=10
    )
    assert stopped.deployment.state == pb.DeploymentState.DEPLOYMENT_STATE_STOPPED
    again = server.stub.DeployModel(deploy_request(max_replicas=1, lb_port=8081), timeout=10).deployment
    assert list(again.accelerator_indexes) == [0, 1]
    envs = server.envelopes(4)
    rejected = envs[1]
    assert [t.to for t in rejected.lifecycle.transitions][-1] == S.LIFECYCLE_STATE_REJECTED
    assert [g.stage for g in rejected.grants] == [GrantStage.GRANT_STAGE_ADMISSION]
    assert not rejected.HasField("binding")
    assert rejected.outcome.reason_code == "INSUFFICIENT_CAPACITY"
    assert rejected.outcome.status_message == (
        "room for 0 replica(s) on gpu-a100-0, at least 1 needed (free accelerators and host memory are short)"
    )


def test_admission_limit_narrows_accelerators_and_the_backend_respects_it(
    serve: Callable[..., Server],
) -> None:
    limits = LimitsPolicy(
        [
            Limit(
                ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT,
                2,
                kind=ExecutionKind.EXECUTION_KIND_DEPLOYMENT,
            )
        ]
    )
    server = serve(policies=[limits])
    request = deploy_request(accelerator_count=4, accelerator_memory_gib=100, max_replicas=1)
    deployment = server.stub.DeployModel(request, timeout=10).deployment
    # Without the limit, 4 accelerators would have been placed: the other two stay free.
    other = server.stub.DeployModel(deploy_request(max_replicas=1, lb_port=8081), timeout=10).deployment
    assert (list(deployment.accelerator_indexes), list(other.accelerator_indexes)) == ([0, 1], [2, 3])
    env = server.envelopes(2)[0]
    asked = copy_of(ASKED)
    asked.accelerator_count = 4
    asked.accelerator_memory_bytes = 100 * GiB
    asked.replicas_max = 1
    admitted = copy_of(asked)
    admitted.accelerator_count = 2
    message = "accelerator_count 4 exceeds the limit of 2 for EXECUTION_KIND_DEPLOYMENT"
    reason = f"admission policy limits: {message}"
    assert deployment.grant_reason == reason
    assert stable(env) == deployed(
        request,
        requested=asked,
        decision=Decision(
            outcome=OUT.DECISION_OUTCOME_NARROWED,
            policies=[
                PolicyVerdict(
                    policy="limits",
                    outcome=OUT.DECISION_OUTCOME_NARROWED,
                    mode=EnforcementMode.ENFORCEMENT_MODE_ENFORCE,
                    reason_code="LIMIT_NARROWED",
                    message=message,
                )
            ],
            deciding_policy="limits",
            reason_code="LIMIT_NARROWED",
            message=message,
            mode=EnforcementMode.ENFORCEMENT_MODE_ENFORCE,
        ),
        grants=[
            admission_grant(
                admitted, OUT.DECISION_OUTCOME_NARROWED, reason_code="LIMIT_NARROWED", reason=message
            ),
            backend_grant(
                admitted, OUT.DECISION_OUTCOME_NARROWED, reason_code="LIMIT_NARROWED", reason=reason
            ),
        ],
        binding=binding(deployment, [0, 1]),
        moves=[
            RECEIVED,
            NORMALIZED,
            (S.LIFECYCLE_STATE_ADMITTED, "admission", "LIMIT_NARROWED"),
            (S.LIFECYCLE_STATE_GRANTED, "backend", "LIMIT_NARROWED"),
            (S.LIFECYCLE_STATE_BOUND, "backend", ""),
            (S.LIFECYCLE_STATE_COMPLETED, "completion", ""),
        ],
        outcome=completed(request, replicas_started=1),
    )


def control(method: str, request: Any, target: Target, moves: Sequence[Any], **fields: Any) -> str:
    """The stable envelope of a Get, List or Stop call."""
    return envelope(
        method,
        request,
        kind=ExecutionKind.EXECUTION_KIND_CONTROL,
        target=target,
        grants=[admission_grant(Resources())],
        moves=moves,
        **fields,
    )


CONTROL_DONE = [
    RECEIVED,
    NORMALIZED,
    (S.LIFECYCLE_STATE_ADMITTED, "admission", ""),
    (S.LIFECYCLE_STATE_COMPLETED, "completion", ""),
]


def test_get_list_and_stop(server: Server) -> None:
    stub = server.stub
    first = stub.DeployModel(deploy_request(max_replicas=1), timeout=10).deployment
    second = stub.DeployModel(
        deploy_request(tenant="globex", location="eu-west", accelerator_type="nvidia-h100", lb_port=None),
        timeout=10,
    ).deployment
    assert (second.node, second.endpoint) == ("gpu-h100-0", "10.0.2.10:8000")

    get = pb.GetDeploymentRequest(deployment_id=first.deployment_id)
    assert stub.GetDeployment(get, timeout=10).deployment == first
    everything = stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10)
    assert (list(everything.deployments), everything.next_page_token) == ([first, second], "")
    by_tenant = pb.ListDeploymentsRequest(tenant="globex")
    assert list(stub.ListDeployments(by_tenant, timeout=10).deployments) == [second]
    page = stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1), timeout=10)
    assert (list(page.deployments), page.next_page_token) == ([first], "1")
    page = stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1, page_token="1"), timeout=10)
    assert (list(page.deployments), page.next_page_token) == ([second], "")

    stop = pb.StopDeploymentRequest(deployment_id=first.deployment_id)
    stopped = stub.StopDeployment(stop, timeout=10).deployment
    assert stopped.state == pb.DeploymentState.DEPLOYMENT_STATE_STOPPED
    assert stub.StopDeployment(stop, timeout=10).deployment == stopped  # stopping again changes nothing
    assert stub.GetDeployment(get, timeout=10).deployment.state == pb.DeploymentState.DEPLOYMENT_STATE_STOPPED
    running = pb.ListDeploymentsRequest(state=pb.DeploymentState.DEPLOYMENT_STATE_RUNNING)
    assert list(stub.ListDeployments(running, timeout=10).deployments) == [second]

    envs = server.envelopes(11)
    target = Target(type="deployment", name=first.deployment_id)
    everyone = Target(type="deployment")
    assert stable(envs[2]) == control("GetDeployment", get, target, CONTROL_DONE, outcome=completed(get))
    assert stable(envs[3]) == control(
        "ListDeployments",
        pb.ListDeploymentsRequest(),
        everyone,
        CONTROL_DONE,
        outcome=completed(pb.ListDeploymentsRequest()),
    )
    assert stable(envs[4]) == control(
        "ListDeployments", by_tenant, everyone, CONTROL_DONE, tenant="globex", outcome=completed(by_tenant)
    )
    assert stable(envs[7]) == control("StopDeployment", stop, target, CONTROL_DONE, outcome=completed(stop))


def _tenant_header(call: CallInfo) -> Principal | None:
    """Callers named by an "x-test-tenant" header (a user of that tenant) or
    an "x-test-service" one (a service of no tenant), as an identity source would."""
    tenant, service = call.metadata.get("x-test-tenant"), call.metadata.get("x-test-service")
    if isinstance(tenant, str):
        return Principal(subject=f"user:{tenant}", tenant=tenant, auth_method=AuthMethod.AUTH_METHOD_JWT)
    if isinstance(service, str):
        return Principal(subject=f"service:{service}", auth_method=AuthMethod.AUTH_METHOD_MTLS)
    return None


def test_an_authenticated_caller_sees_and_stops_only_its_tenants_deployments(
    serve: Callable[..., Server],
) -> None:
    stub = serve(resolvers=[_tenant_header]).stub
    acme, globex = (("x-test-tenant", "acme"),), (("x-test-tenant", "globex"),)
    mine = stub.DeployModel(deploy_request(max_replicas=1), metadata=acme, timeout=10).deployment
    theirs = stub.DeployModel(
        deploy_request(tenant="globex", location="eu-west", accelerator_type="nvidia-h100", lb_port=None),
        metadata=globex,
        timeout=10,
    ).deployment
    assert (mine.tenant, theirs.tenant) == ("acme", "globex")

    listed = stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=globex, timeout=10)
    assert list(listed.deployments) == [theirs]
    asked_for_acme = pb.ListDeploymentsRequest(tenant="acme")
    assert list(stub.ListDeployments(asked_for_acme, metadata=globex, timeout=10).deployments) == []
    get = pb.GetDeploymentRequest(deployment_id=mine.deployment_id)
    stop = pb.StopDeploymentRequest(deployment_id=mine.deployment_id)
    errors = [
        refused(lambda: stub.GetDeployment(get, metadata=globex, timeout=10)),
        refused(lambda: stub.StopDeployment(stop, metadata=globex, timeout=10)),
    ]
    assert [(e.code(), error_info(e).reason) for e in errors] == [
        (grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND"),
    ] * 2
    assert stub.GetDeployment(get, metadata=acme, timeout=10).deployment == mine  # still running

    # Dropping the credential does not help: anonymous callers see only anonymous deployments.
    assert list(stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10).deployments) == []
    assert refused(lambda: stub.StopDeployment(stop, timeout=10)).code() is grpc.StatusCode.NOT_FOUND
    # Principals of no tenant see only their own.
    builder, other = (("x-test-service", "builder"),), (("x-test-service", "other"),)
    built = stub.DeployModel(
        deploy_request(tenant=None, lb_port=9090, max_replicas=1), metadata=builder, timeout=10
    ).deployment
    assert list(
        stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=builder, timeout=10).deployments
    ) == [built]
    assert (
        list(stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=other, timeout=10).deployments) == []
    )
    assert stub.GetDeployment(get, metadata=acme, timeout=10).deployment.state == mine.state


def test_unknown_deployment_is_not_found(server: Server) -> None:
    stub = server.stub
    unknown = "dep-000000000000"
    get = pb.GetDeploymentRequest(deployment_id=unknown)
    stop = pb.StopDeploymentRequest(deployment_id=unknown)
    bad_page = pb.ListDeploymentsRequest(page_token="x")
    superscript = pb.ListDeploymentsRequest(page_token="²")  # a digit to str.isdigit, not to int()
    errors = [
        refused(lambda: stub.GetDeployment(get, timeout=10)),
        refused(lambda: stub.StopDeployment(stop, timeout=10)),
        refused(lambda: stub.ListDeployments(bad_page, timeout=10)),
        refused(lambda: stub.ListDeployments(superscript, timeout=10)),
    ]
    assert [(e.code(), error_info(e).reason) for e in errors] == [
        (grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND"),
        (grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
    ]
    envs = server.envelopes(4)
    message = f"no deployment {unknown}"
    outcome = Outcome(status_code=5, status_message=message, reason_code="DEPLOYMENT_NOT_FOUND")
    target = Target(type="deployment", name=unknown)
    moves = rejected_moves("DEPLOYMENT_NOT_FOUND")
    assert stable(envs[0]) == control("GetDeployment", get, target, moves, outcome=outcome)
    assert stable(envs[1]) == control("StopDeployment", stop, target, moves, outcome=outcome)
    assert envs[2].outcome.reason_code == "INVALID_PAGE_TOKEN"


def test_a_deployment_expires_after_its_lifetime(serve: Callable[..., Server]) -> None:
    now = [1000.0]
    servicer = DeploymentServicer(clock=lambda: now[0])
    service = _runtime.Service(
        SERVICE_NAME,
        lambda grpc_server: pb_grpc.add_DeploymentServiceServicer_to_server(servicer, grpc_server),
    )
    server = serve(service_list=[service])
    short = server.stub.DeployModel(deploy_request(lifetime_seconds=60), timeout=10).deployment
    now[0] += 59
    get = pb.GetDeploymentRequest(deployment_id=short.deployment_id)
    assert (
        server.stub.GetDeployment(get, timeout=10).deployment.state
        == pb.DeploymentState.DEPLOYMENT_STATE_RUNNING
    )
    now[0] += 1
    assert (
        server.stub.GetDeployment(get, timeout=10).deployment.state
        == pb.DeploymentState.DEPLOYMENT_STATE_EXPIRED
    )
    assert servicer.engine.allocations() == {}


def test_ended_deployments_stay_readable_until_newer_ones_have_ended(serve: Callable[..., Server]) -> None:
    now = [1000.0]
    servicer = DeploymentServicer(clock=lambda: now[0], retain_ended=2)
    service = _runtime.Service(
        SERVICE_NAME,
        lambda grpc_server: pb_grpc.add_DeploymentServiceServicer_to_server(servicer, grpc_server),
    )
    server = serve(service_list=[service])
    small = {"lb_port": None, "max_replicas": 1, "accelerator_count": 1, "accelerator_memory_gib": 80}
    stopped, expiring, running, last = (
        server.stub.DeployModel(deploy_request(**small, **ask), timeout=10).deployment.deployment_id
        for ask in ({}, {"lifetime_seconds": 60}, {}, {})
    )
    server.stub.StopDeployment(pb.StopDeploymentRequest(deployment_id=stopped), timeout=10)
    now[0] += 60
    server.stub.StopDeployment(pb.StopDeploymentRequest(deployment_id=last), timeout=10)

    def state(deployment_id: str) -> Any:
        get = pb.GetDeploymentRequest(deployment_id=deployment_id)
        try:
            return server.stub.GetDeployment(get, timeout=10).deployment.state
        except grpc.RpcError as error:
            return error.code()

    assert [state(d) for d in (stopped, expiring, running, last)] == [
        grpc.StatusCode.NOT_FOUND,  # the oldest of three ended: forgotten
        pb.DeploymentState.DEPLOYMENT_STATE_EXPIRED,
        pb.DeploymentState.DEPLOYMENT_STATE_RUNNING,
        pb.DeploymentState.DEPLOYMENT_STATE_STOPPED,
    ]
    listed = server.stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10).deployments
    assert sorted(d.deployment_id for d in listed) == sorted([expiring, running, last])
    assert set(servicer.engine.allocations()) == {running}


def test_health_and_reflection(server: Server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in (SERVICE_NAME, ""):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    [listed] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {service.name for service in listed.list_services_response.service}
    assert SERVICE_NAME in names
    [found] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]), timeout=10
    )
    assert found.file_descriptor_response.file_descriptor_proto
    # Health and reflection build no envelopes.
    assert server.collector.envelopes == []


def test_the_servicer_runs_without_the_envelope_interceptor() -> None:
    from concurrent import futures

    plain = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DeploymentServiceServicer_to_server(DeploymentServicer(), plain)
    port = plain.add_insecure_port("127.0.0.1:0")
    plain.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.DeploymentServiceStub(channel)
            deployment = stub.DeployModel(deploy_request(accelerator_memory_gib=None), timeout=10).deployment
            assert (deployment.accelerator_memory_gib, deployment.envelope_id) == (160, "")
            assert (
                deployment.grant_reason
                == "accelerator memory 160 GiB per replica (2 x nvidia-a100 of 80 GiB)"
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.DeployModel(deploy_request(accelerator_type="nvidia-h100"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        plain.stop(None).wait()


# -- python -m services.deployment -----------------------------------------------------------


def test_python_m_serves_answers_health_and_stops_on_sigterm() -> None:
    with python_m("deployment") as (process, address):
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert stop_with_sigterm(process) == 0


def test_a_busy_port_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            _runtime.main("deployment", lambda args, provider: services(), ["--port", str(port)])
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error == f"python -m services.deployment: cannot listen on 127.0.0.1:{port}\n"
