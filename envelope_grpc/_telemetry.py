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
from envelope_grpc._envelope import QUANTITIES, REJECTED
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
_PRINCIPAL_NAMES: Final = _names(PrincipalKind, "PRINCIPAL_KIND_")
_AUTH_NAMES: Final = _names(AuthMethod, "AUTH_METHOD_")
_CLASS_NAMES: Final = _names(DataClassification, "DATA_CLASSIFICATION_")
_MODE_NAMES: Final = _names(EnforcementMode, "ENFORCEMENT_MODE_")
_FLAG_NAMES: Final = _names(EnvelopeFlag, "ENVELOPE_FLAG_")


def _resources(out: dict[str, AttributeValue], prefix: str, resources: Resources) -> None:
    for name in QUANTITIES:
        if resources.HasField(name):
            out[prefix + name] = getattr(resources, name)
    if resources.accelerator_type:
        out[prefix + "accelerator_type"] = resources.accelerator_type


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
        k.ATTR_PRINCIPAL_KIND: _PRINCIPAL_NAMES[principal.kind],
        k.ATTR_AUTH: _AUTH_NAMES[principal.auth_method],
        k.ATTR_STATUS: env.outcome.status_code,
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
        out[k.ATTR_CLASSIFICATION] = _CLASS_NAMES[env.scope.data_classification]
    if decision.policies:
        out[k.ATTR_MODE] = _MODE_NAMES[decision.mode]
    if decision.fail_open:
        out[k.ATTR_FAIL_OPEN] = True
    if env.flags:
        out[k.ATTR_FLAGS] = [_FLAG_NAMES[flag] for flag in env.flags]
    _resources(out, k.ATTR_REQUESTED_PREFIX, env.requested)
    if env.grants:
        _resources(out, k.ATTR_GRANTED_PREFIX, env.grants[-1].resources)
    usage = env.outcome.usage
    for field, value in usage.ListFields():
        out[k.ATTR_USAGE_PREFIX + field.name] = value
    return out


def annotate(span: trace.Span, env: ExecutionEnvelope) -> None:
    """Put the envelope on ``span``: attributes, one event per lifecycle
    transition, and an error status when the call was rejected."""
    if not span.is_recording():
        return
    span.set_attributes(attributes(env))
    for step in env.lifecycle.transitions:
        event: dict[str, AttributeValue] = {
            "from": STATE_NAMES[getattr(step, "from")],
            "to": STATE_NAMES[step.to],
            "actor": step.actor,
        }
        if step.reason:
            event["reason"] = step.reason
        span.add_event(k.TRANSITION_EVENT, event, timestamp=step.time.ToNanoseconds())
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

    def record(self, env: ExecutionEnvelope) -> None:
        """Count one admission decision and its resource amounts."""
        base = {
            "execution_envelope.kind": KIND_NAMES[env.execution.kind],
            "execution_envelope.tenant": env.principal.tenant,
        }
        self._admissions.add(1, {**base, "execution_envelope.outcome": OUTCOME_NAMES[env.decision.outcome]})
        for counter, resources in ((self._requested, env.requested), (self._granted, _granted(env))):
            if resources is None:
                continue
            for name in QUANTITIES:
                if resources.HasField(name):
                    counter.add(getattr(resources, name), {**base, "execution_envelope.dimension": name})


def _granted(env: ExecutionEnvelope) -> Resources | None:
    return env.grants[-1].resources if env.grants else None
