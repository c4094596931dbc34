"""OpenTelemetry output: span attributes, lifecycle span events, metrics.

Attributes are set in one ``set_attributes`` call from the key table in
_constants; nothing is computed for a span that is not recording.
"""

from __future__ import annotations

from typing import Final

from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from envelope_grpc import _constants as k
from envelope_grpc._envelope import ADMITTED, COMPLETED, NORMALIZED, QUANTITIES, RECEIVED, REJECTED
from envelope_grpc._values import OUTCOME_ADMITTED
from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    DataClassification,
    DecisionOutcome,
    EnforcementMode,
    EnvelopeFlag,
    ExecutionEnvelope,
    ExecutionKind,
    LifecycleState,
    PrincipalKind,
    Resources,
)


def _short(enum_name: str, prefix: str) -> str:
    return enum_name[len(prefix) :].lower()


def _names(enum: object, prefix: str) -> dict[int, str]:
    return {number: _short(name, prefix) for name, number in enum.items()}  # type: ignore[attr-defined]


KIND_NAMES: Final = _names(ExecutionKind, "EXECUTION_KIND_")
OUTCOME_NAMES: Final = _names(DecisionOutcome, "DECISION_OUTCOME_")
STATE_NAMES: Final = _names(LifecycleState, "LIFECYCLE_STATE_")
PRINCIPAL_NAMES: Final = _names(PrincipalKind, "PRINCIPAL_KIND_")
AUTH_NAMES: Final = _names(AuthMethod, "AUTH_METHOD_")
CLASSIFICATION_NAMES: Final = _names(DataClassification, "DATA_CLASSIFICATION_")
MODE_NAMES: Final = _names(EnforcementMode, "ENFORCEMENT_MODE_")
FLAG_NAMES: Final = _names(EnvelopeFlag, "ENVELOPE_FLAG_")


def _resources(out: dict[str, AttributeValue], prefix: str, resources: Resources) -> None:
    for field, value in resources.ListFields():
        out[prefix + field.name] = value


def attributes(env: ExecutionEnvelope) -> dict[str, AttributeValue]:
    """The envelope as ``execution_envelope.*`` span attributes (set values only)."""
    execution = env.execution
    principal = env.principal
    decision = env.decision
    out: dict[str, AttributeValue] = {
        k.ATTR_ID: env.envelope_id,
        k.ATTR_REQUEST_ID: env.request_id,
        k.ATTR_KIND: KIND_NAMES[execution.kind],
        k.ATTR_STATE: STATE_NAMES[env.lifecycle.state],
        k.ATTR_OUTCOME: OUTCOME_NAMES[decision.outcome],
        k.ATTR_PRINCIPAL_KIND: PRINCIPAL_NAMES[principal.kind],
        k.ATTR_AUTH: AUTH_NAMES[principal.auth_method],
    }
    lineage = env.lineage
    if lineage.parent_envelope_id:
        out[k.ATTR_PARENT_ID] = lineage.parent_envelope_id
        out[k.ATTR_ROOT_ID] = lineage.root_envelope_id
        out[k.ATTR_DEPTH] = lineage.depth
    target = execution.target
    for key, value in (
        (k.ATTR_TARGET_TYPE, target.type),
        (k.ATTR_TARGET_NAME, target.name),
        (k.ATTR_TARGET_VERSION, target.version),
        (k.ATTR_SUBJECT, principal.subject),
        (k.ATTR_TENANT, principal.tenant),
        (k.ATTR_PROJECT, principal.project),
        (k.ATTR_REGION, env.scope.region),
        (k.ATTR_POLICY, decision.deciding_policy),
        (k.ATTR_REASON, decision.reason_code or env.outcome.reason_code),
        (k.ATTR_BINDING_NODE, env.binding.node),
        (k.ATTR_BINDING_ENDPOINT, env.binding.endpoint),
    ):
        if value:
            out[key] = value
    if env.scope.data_classification:
        out[k.ATTR_CLASSIFICATION] = CLASSIFICATION_NAMES[env.scope.data_classification]
    if decision.policies:
        out[k.ATTR_MODE] = MODE_NAMES[decision.mode]
    if decision.fail_open:
        out[k.ATTR_FAIL_OPEN] = True
    if env.flags:
        out[k.ATTR_FLAGS] = [FLAG_NAMES[flag] for flag in env.flags]
    _resources(out, k.ATTR_REQUESTED_PREFIX, env.requested)
    if env.grants and env.grants[-1].outcome != OUTCOME_ADMITTED:  # as asked: requested says it all
        _resources(out, k.ATTR_GRANTED_PREFIX, env.grants[-1].resources)
    usage = env.outcome.usage
    streamed = usage.request_messages > 1 or usage.response_messages > 1
    for field, value in usage.ListFields():
        if streamed or field.name not in _STREAM_USAGE:
            out[k.ATTR_USAGE_PREFIX + field.name] = value
    return out


# Message counts, sizes and duration say nothing a unary call's span does not
# already say; they are reported for streams.
_STREAM_USAGE: Final = frozenset(
    {"request_messages", "response_messages", "request_bytes", "response_bytes", "duration_ms"}
)


#: Steps every admitted call makes; they get a span event only with a reason.
_PLAIN_STEPS: Final = frozenset({RECEIVED, NORMALIZED, ADMITTED, COMPLETED})

#: One span event name per lifecycle state reached: "execution_envelope.admitted", ...
_EVENT_NAMES: Final = {state: f"{k.NAMESPACE}.{name}" for state, name in STATE_NAMES.items()}


def annotate(span: trace.Span, env: ExecutionEnvelope) -> None:
    """Put the envelope on ``span``: its attributes, the lifecycle path, a
    span event for every step that says more than the path (a reason, a
    backend step, an end other than completion), and an error status when the
    call was rejected."""
    if not span.is_recording():
        return
    out = attributes(env)
    steps = env.lifecycle.transitions
    start = env.lifecycle.start_time
    start_ns = start.seconds * 1_000_000_000 + start.nanos
    path: list[str] = []
    offsets: list[int] = []
    for step in steps:
        stamp = step.time
        ns = stamp.seconds * 1_000_000_000 + stamp.nanos
        path.append(STATE_NAMES[step.to])
        offsets.append((ns - start_ns) // 1000)
        # A span event costs ~5 µs: the plain steps are told by the path alone.
        if step.reason or step.to not in _PLAIN_STEPS:
            event = {"actor": step.actor, "reason": step.reason} if step.reason else {"actor": step.actor}
            span.add_event(_EVENT_NAMES[step.to], event, timestamp=ns)
    out[k.ATTR_LIFECYCLE] = path
    out[k.ATTR_LIFECYCLE_OFFSETS] = offsets
    span.set_attributes(out)
    if env.lifecycle.state == REJECTED:
        span.set_status(Status(StatusCode.ERROR, f"{env.outcome.reason_code}: {env.outcome.status_message}"))


class Metrics:
    """Admissions by kind, outcome and tenant; requested and granted amounts
    by resource dimension. Uses the global meter provider unless given one."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter("envelope_grpc", meter_provider=meter_provider)
        self._admissions = meter.create_counter(
            k.METRIC_ADMISSIONS, unit="{call}", description="Admission decisions by kind, outcome and tenant."
        )
        self._requested = meter.create_counter(
            k.METRIC_REQUESTED, unit="1", description="Requested resource amounts by dimension."
        )
        self._granted = meter.create_counter(
            k.METRIC_GRANTED, unit="1", description="Granted resource amounts by dimension."
        )

        self._labels: dict[tuple[str, ...], dict[str, str]] = {}

    def _label(self, *values: str) -> dict[str, str]:
        # Label dicts are reused across calls; the cache is bounded by clearing.
        found = self._labels.get(values)
        if found is None:
            if len(self._labels) > 4096:
                self._labels.clear()
            kind, tenant, key, value = values
            found = self._labels[values] = {
                "execution_envelope.kind": kind,
                "execution_envelope.tenant": tenant,
                key: value,
            }
        return found

    def record(self, env: ExecutionEnvelope) -> None:
        """Count one admission decision and its resource amounts."""
        kind = KIND_NAMES[env.execution.kind]
        tenant = env.principal.tenant
        outcome = OUTCOME_NAMES[env.decision.outcome]
        self._admissions.add(1, self._label(kind, tenant, "execution_envelope.outcome", outcome))
        for counter, resources in ((self._requested, env.requested), (self._granted, _granted(env))):
            if resources is None:
                continue
            for field, value in resources.ListFields():
                if field.name in QUANTITIES:
                    counter.add(value, self._label(kind, tenant, "execution_envelope.dimension", field.name))


def _granted(env: ExecutionEnvelope) -> Resources | None:
    return env.grants[-1].resources if env.grants else None
