"""The DeploymentService servicer (sync grpc).

DeployModel reads the call's envelope, places the deployment within the
admission grant, and records the backend's steps through the handler API:
its final grant (with a reason for every difference from the request), the
binding to node, accelerators and endpoint, and the replicas started. A
placement the engine refuses is rejected with its reason code and a fitting
status. Get, List and Stop read and change the deployments kept in memory;
an authenticated caller sees and stops only its own tenant's deployments
(its own, when it has no tenant), an anonymous caller only those made
anonymously: any other is not found.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import grpc

import envelope_grpc
from envelope_grpc import ExtractorRegistry
from envelope_grpc.v1.envelope_pb2 import AuthMethod, Binding, ExecutionEnvelope, Resources, Usage
from services._handler import admission_grant, refuse
from services.deployment.placement import (
    QUANTITY_FIELDS,
    Adjustment,
    Ask,
    GiB,
    Inventory,
    Placement,
    PlacementEngine,
    PlacementError,
    Quantities,
    Refusal,
    summarize,
)
from services.deployment.v1 import deployment_pb2 as pb
from services.deployment.v1 import deployment_pb2_grpc as pb_grpc

SERVICE_NAME: Final = "services.deployment.v1.DeploymentService"
DEPLOY_METHOD: Final = f"/{SERVICE_NAME}/DeployModel"
#: Deployments per ListDeployments page when the caller names no size, and the most.
DEFAULT_PAGE_SIZE: Final = 50
#: Ended deployments kept readable, most recent first.
DEFAULT_RETAIN_ENDED: Final = 10_000
MAX_PAGE_SIZE: Final = 1000

#: The status code of each kind of placement refusal.
STATUS_CODES: Final = {
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

RUNNING: Final = pb.DeploymentState.DEPLOYMENT_STATE_RUNNING
STOPPED: Final = pb.DeploymentState.DEPLOYMENT_STATE_STOPPED
EXPIRED: Final = pb.DeploymentState.DEPLOYMENT_STATE_EXPIRED


def quantities(resources: Resources) -> Quantities:
    """The placement engine's view of envelope Resources."""
    values: dict[str, Any] = {}
    for name in QUANTITY_FIELDS:
        field: Any = name
        values[name] = getattr(resources, name) if resources.HasField(field) else None
    return Quantities(accelerator_type=resources.accelerator_type, **values)


def resources(granted: Quantities) -> Resources:
    """Envelope Resources of what the placement engine granted."""
    found = Resources(accelerator_type=granted.accelerator_type)
    for name in QUANTITY_FIELDS:
        value = getattr(granted, name)
        if value is not None:
            setattr(found, name, value)
    return found


@functools.cache
def _deploy_extractor() -> envelope_grpc.Extractor:
    extractor = ExtractorRegistry().plan(DEPLOY_METHOD).extractor
    assert extractor is not None, "DeployModelRequest carries envelope annotations"
    return extractor


def requested_resources(request: pb.DeployModelRequest) -> Resources:
    """What a request asks for, read through its own annotations, for a
    servicer that runs without the envelope interceptor."""
    return _deploy_extractor()(request).requested


@dataclasses.dataclass(slots=True)
class _Record:
    deployment: pb.Deployment
    expires_at: float | None
    #: Who may see and stop it (see _owner).
    owner: tuple[str, str] | None


class DeploymentServicer(pb_grpc.DeploymentServiceServicer):
    """Deploys models onto an inventory; deployments live in memory.

    ``clock`` (seconds, monotonic) decides when a deployment's lifetime ends:
    an expired deployment frees its accelerators and reads as EXPIRED.
    Ended deployments (stopped or expired) stay readable until
    ``retain_ended`` more recent ones have ended.
    """

    def __init__(
        self,
        inventory: Inventory | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        retain_ended: int = DEFAULT_RETAIN_ENDED,
    ) -> None:
        if retain_ended < 0:
            raise ValueError(f"retain_ended must not be negative: {retain_ended}")
        self.engine = PlacementEngine(inventory) if inventory is not None else PlacementEngine()
        self._clock = clock
        self._retain_ended = retain_ended
        self._lock = threading.Lock()
        self._deployments: dict[str, _Record] = {}
        #: (expiry, id) of every deployment with a lifetime, soonest first.
        self._expiries: list[tuple[float, str]] = []
        #: Ended deployments, in the order they ended.
        self._ended: collections.deque[str] = collections.deque()

    # -- DeployModel -------------------------------------------------------------------

    def DeployModel(
        self, request: pb.DeployModelRequest, context: grpc.ServicerContext
    ) -> pb.DeployModelResponse:
        env = envelope_grpc.current_envelope()
        requested = env.requested if env is not None else requested_resources(request)
        admitted = admission_grant(env)
        ceiling = admitted.resources if admitted is not None else None
        ask = Ask(
            model=request.model_id,
            resources=quantities(requested),
            engine=request.engine,
            region=request.location,
            force_cpu=request.force_cpu,
            port=request.lb_port if request.HasField("lb_port") else None,
        )
        deployment_id = f"dep-{uuid.uuid4().hex[:12]}"
        try:
            placement = self._place(deployment_id, ask, ceiling, request, env)
        except PlacementError as refused:
            refuse(context, refused.reason_code, refused.message, STATUS_CODES[refused.refusal])
        try:
            reason = self._record(env, placement)
        except BaseException:
            with self._lock:
                self.engine.release(deployment_id)
                del self._deployments[deployment_id]
            raise
        with self._lock:
            deployment = self._deployments[deployment_id].deployment
            deployment.grant_reason = reason
            return pb.DeployModelResponse(deployment=deployment)

    def _place(
        self,
        deployment_id: str,
        ask: Ask,
        ceiling: Resources | None,
        request: pb.DeployModelRequest,
        env: ExecutionEnvelope | None,
    ) -> Placement:
        """Place and keep the deployment; PlacementError when refused."""
        bounds = quantities(ceiling) if ceiling is not None else None
        with self._lock:
            self._reap()
            placement = self.engine.place(deployment_id, ask, bounds)
            lifetime = placement.granted.duration_ms
            expires = self._clock() + lifetime / 1000 if lifetime is not None else None
            deployment = self._deployment(request, placement, env)
            self._deployments[deployment_id] = _Record(deployment, expires, _owner())
            if expires is not None:
                heapq.heappush(self._expiries, (expires, deployment_id))
            return placement

    @staticmethod
    def _deployment(
        request: pb.DeployModelRequest, placement: Placement, env: ExecutionEnvelope | None
    ) -> pb.Deployment:
        granted = placement.granted
        return pb.Deployment(
            deployment_id=placement.deployment_id,
            state=RUNNING,
            model_id=request.model_id,
            version=request.version,
            engine=placement.engine,
            tenant=env.principal.tenant if env is not None else request.tenant,
            project=env.principal.project if env is not None else request.project,
            region=placement.node.region,
            node=placement.node.name,
            accelerator_indexes=placement.accelerator_indexes,
            accelerator_type=granted.accelerator_type,
            accelerator_count=granted.accelerator_count or 0,
            accelerator_memory_gib=(granted.accelerator_memory_bytes or 0) / GiB,
            memory_gib=(granted.memory_bytes or 0) / GiB,
            min_replicas=granted.replicas_min or 0,
            starting_replicas=granted.replicas_start or 0,
            max_replicas=granted.replicas_max or 0,
            endpoint=placement.endpoint,
            lifetime_seconds=(granted.duration_ms or 0) // 1000,
            envelope_id=env.envelope_id if env is not None else "",
        )

    @staticmethod
    def _record(env: ExecutionEnvelope | None, placement: Placement) -> str:
        """Record the backend's grant, binding and usage; returns the grant's
        reason (empty when granted as asked)."""
        if env is None:
            return summarize(placement.adjustments)[1]
        granted = resources(placement.granted)
        reason = ""
        if granted == env.requested:
            envelope_grpc.record_grant(granted)
        else:
            admitted = admission_grant(env)
            extra = []
            if admitted is not None and admitted.resources != env.requested:
                policy = env.decision.deciding_policy
                by = f"admission policy {policy}" if policy else "admission"
                code = admitted.reason_code or "ADMISSION_NARROWED"
                extra.append(Adjustment(code, f"{by}: {admitted.reason}"))
            code, reason = summarize(placement.adjustments, extra)
            if not reason:
                code, reason = "PLACEMENT_ADJUSTED", "placement granted other resources than asked"
            envelope_grpc.record_grant(granted, reason_code=code, reason=reason)
        envelope_grpc.record_binding(
            Binding(
                node=placement.node.name,
                accelerator_indexes=placement.accelerator_indexes,
                runtime=placement.engine,
                endpoint=placement.endpoint,
                region=placement.node.region,
                attributes={
                    "deployment_id": placement.deployment_id,
                    "replicas_max": str(placement.granted.replicas_max),
                    "lb_port": str(placement.port),
                },
            )
        )
        envelope_grpc.record_usage(Usage(replicas_started=placement.granted.replicas_start or 0))
        return reason

    # -- Get, List, Stop ---------------------------------------------------------------

    def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.ServicerContext
    ) -> pb.GetDeploymentResponse:
        with self._lock:
            self._reap()
            found = self._find(request.deployment_id, context)
            return pb.GetDeploymentResponse(deployment=found.deployment)

    def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            refuse(
                context,
                "INVALID_REQUEST",
                f"page_size must be within 1..{MAX_PAGE_SIZE}",
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        token = request.page_token
        if token and not (token.isascii() and token.isdigit()):
            refuse(context, "INVALID_PAGE_TOKEN", "page_token is not valid", grpc.StatusCode.INVALID_ARGUMENT)
        offset = int(token or 0)
        owner = _owner()
        with self._lock:
            self._reap()
            matching = [
                record.deployment
                for record in self._deployments.values()
                if record.owner == owner
                and (not request.tenant or record.deployment.tenant == request.tenant)
                and (not request.region or record.deployment.region == request.region)
                and (not request.state or record.deployment.state == request.state)
            ]
            following = str(offset + size) if offset + size < len(matching) else ""
            return pb.ListDeploymentsResponse(
                deployments=matching[offset : offset + size], next_page_token=following
            )

    def StopDeployment(
        self, request: pb.StopDeploymentRequest, context: grpc.ServicerContext
    ) -> pb.StopDeploymentResponse:
        with self._lock:
            self._reap()
            found = self._find(request.deployment_id, context)
            if found.deployment.state == RUNNING:
                self._end(request.deployment_id, found, STOPPED)
            return pb.StopDeploymentResponse(deployment=found.deployment)

    def _find(self, deployment_id: str, context: grpc.ServicerContext) -> _Record:
        if not deployment_id:
            refuse(
                context, "INVALID_REQUEST", "a deployment id is required", grpc.StatusCode.INVALID_ARGUMENT
            )
        found = self._deployments.get(deployment_id)
        if found is None or found.owner != _owner():
            refuse(
                context,
                "DEPLOYMENT_NOT_FOUND",
                f"no deployment {deployment_id}",
                grpc.StatusCode.NOT_FOUND,
            )
        return found

    def _reap(self) -> None:
        """End the deployments whose lifetime ran out (lock held)."""
        now = self._clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, key = heapq.heappop(expiries)
            record = self._deployments.get(key)
            if record is not None and record.deployment.state == RUNNING:
                self._end(key, record, EXPIRED)

    def _end(self, key: str, record: _Record, state: pb.DeploymentState.ValueType) -> None:
        """Free a running deployment's accelerators and mark it ``state``;
        forget the oldest ended deployments past the retention (lock held)."""
        self.engine.release(key)
        record.deployment.state = state
        ended = self._ended
        ended.append(key)
        while len(ended) > self._retain_ended:
            self._deployments.pop(ended.popleft(), None)


def _owner() -> tuple[str, str] | None:
    """Whose deployments the caller sees and stops: an authenticated caller's
    tenant (its subject when it has none); None, anonymous callers' own, for
    an anonymous one."""
    env = envelope_grpc.current_envelope()
    if env is None or env.principal.auth_method == AuthMethod.AUTH_METHOD_NONE:
        return None
    principal = env.principal
    return ("tenant", principal.tenant) if principal.tenant else ("subject", principal.subject)
