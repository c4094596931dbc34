"""OpenTelemetry output: span attributes, lifecycle span events, metrics.

Attributes are set in one ``set_attributes`` call from the key table in
_constants; nothing is computed for a span that is not recording.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Final

from google.protobuf.message import Message
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from envelope_grpc import _constants as k
from envelope_grpc._envelope import ADMITTED, COMPLETED, NORMALIZED, QUANTITIES, RECEIVED, REJECTED
from envelope_grpc._values import OUTCOME_ADMITTED, enum_names
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

KIND_NAMES: Final = enum_names(ExecutionKind.DESCRIPTOR)
OUTCOME_NAMES: Final = enum_names(DecisionOutcome.DESCRIPTOR)
STATE_NAMES: Final = enum_names(LifecycleState.DESCRIPTOR)
PRINCIPAL_NAMES: Final = enum_names(PrincipalKind.DESCRIPTOR)
AUTH_NAMES: Final = enum_names(AuthMethod.DESCRIPTOR)
CLASSIFICATION_NAMES: Final = enum_names(DataClassification.DESCRIPTOR)
MODE_NAMES: Final = enum_names(EnforcementMode.DESCRIPTOR)
FLAG_NAMES: Final = enum_names(EnvelopeFlag.DESCRIPTOR)


def _fields(out: dict[str, AttributeValue], prefix: str, message: Message) -> None:
    for field, value in message.ListFields():
        out[prefix + field.name] = value


def _put_set(out: dict[str, AttributeValue], pairs: tuple[tuple[str, str], ...]) -> None:
    for key, value in pairs:
        if value:
            out[key] = value


def attributes(env: ExecutionEnvelope) -> dict[str, AttributeValue]:
    """The envelope as ``execution_envelope.*`` span attributes (set values only)."""
    execution = env.execution
    principal = env.principal
    decision = env.decision
    target = execution.target
    scope = env.scope
    reason = decision.reason_code or env.outcome.reason_code
    out: dict[str, AttributeValue] = {
        k.ATTR_ID: env.envelope_id,
        k.ATTR_REQUEST_ID: env.request_id,
        k.ATTR_KIND: KIND_NAMES[execution.kind],
        k.ATTR_STATE: STATE_NAMES[env.lifecycle.state],
        k.ATTR_OUTCOME: OUTCOME_NAMES[decision.outcome],
        k.ATTR_PRINCIPAL_KIND: PRINCIPAL_NAMES[principal.kind],
        k.ATTR_AUTH: AUTH_NAMES[principal.auth_method],
    }
    if env.HasField("lineage"):
        lineage = env.lineage
        out[k.ATTR_PARENT_ID] = lineage.parent_envelope_id
        out[k.ATTR_ROOT_ID] = lineage.root_envelope_id
        out[k.ATTR_DEPTH] = lineage.depth
    _put_set(
        out,
        (
            (k.ATTR_TARGET_TYPE, target.type),
            (k.ATTR_TARGET_NAME, target.name),
            (k.ATTR_TARGET_VERSION, target.version),
            (k.ATTR_SUBJECT, principal.subject),
            (k.ATTR_TENANT, principal.tenant),
            (k.ATTR_PROJECT, principal.project),
            (k.ATTR_REGION, scope.region),
            (k.ATTR_POLICY, decision.deciding_policy),
            (k.ATTR_REASON, reason),
        ),
    )
    if env.HasField("binding"):
        binding = env.binding
        _put_set(out, ((k.ATTR_BINDING_NODE, binding.node), (k.ATTR_BINDING_ENDPOINT, binding.endpoint)))
    if scope.data_classification:
        out[k.ATTR_CLASSIFICATION] = CLASSIFICATION_NAMES[scope.data_classification]
    if decision.policies:
        out[k.ATTR_MODE] = MODE_NAMES[decision.mode]
    if decision.fail_open:
        out[k.ATTR_FAIL_OPEN] = True
    if env.flags:
        out[k.ATTR_FLAGS] = [FLAG_NAMES[flag] for flag in env.flags]
    _fields(out, k.ATTR_REQUESTED_PREFIX, env.requested)
    grants = env.grants
    if grants and grants[-1].outcome != OUTCOME_ADMITTED:  # as asked: requested says it all
        _fields(out, k.ATTR_GRANTED_PREFIX, grants[-1].resources)
    usage = env.outcome.usage
    if usage.request_messages > 1 or usage.response_messages > 1:
        _fields(out, k.ATTR_USAGE_PREFIX, usage)
    else:
        for field, value in usage.ListFields():
            if field.name not in _STREAM_USAGE:
                out[k.ATTR_USAGE_PREFIX + field.name] = value
    return out


# Message counts, sizes and duration say nothing a unary call's span does not
# already say; they are reported for streams.
_STREAM_USAGE: Final = frozenset(
    {"request_messages", "response_messages", "request_bytes", "response_bytes", "duration_ms"}
)


#: Steps every admitted call makes; they get a span event only with a reason.
_PLAIN_STEPS: Final = frozenset({RECEIVED, NORMALIZED, ADMITTED, COMPLETED})

#: "received:", "normalized:", ...: a state in the lifecycle attribute, before its offset.
_STEP_PREFIXES: Final = {state: f"{name}:" for state, name in STATE_NAMES.items()}

#: One span event name per lifecycle state reached: "execution_envelope.admitted", ...
_EVENT_NAMES: Final = {state: f"{k.NAMESPACE}.{name}" for state, name in STATE_NAMES.items()}


def annotate(span: trace.Span, env: ExecutionEnvelope) -> None:
    """Put the envelope on ``span``: its attributes, the lifecycle path (each
    state with its offset from receipt in microseconds), a
    span event for every step that says more than the path (a reason, a
    backend step, an end other than completion), and an error status when the
    call was rejected."""
    if not span.is_recording():
        return
    out = attributes(env)
    lifecycle = env.lifecycle
    start = lifecycle.start_time
    start_ns = start.seconds * 1_000_000_000 + start.nanos
    path: list[str] = []
    for step in lifecycle.transitions:
        to = step.to
        stamp = step.time
        ns = stamp.seconds * 1_000_000_000 + stamp.nanos
        path.append(_STEP_PREFIXES[to] + str((ns - start_ns) // 1000))
        # A span event costs ~5 µs: the plain steps are told by the path alone.
        reason = step.reason
        if reason or to not in _PLAIN_STEPS:
            event = {"actor": step.actor, "reason": reason} if reason else {"actor": step.actor}
            span.add_event(_EVENT_NAMES[to], event, timestamp=ns)
    # One string, not two lists: a list attribute costs the SDK several times more.
    out[k.ATTR_LIFECYCLE] = " ".join(path)
    span.set_attributes(out)
    if lifecycle.state == REJECTED:
        span.set_status(Status(StatusCode.ERROR, f"{env.outcome.reason_code}: {env.outcome.status_message}"))


class Metrics:
    """Admissions by kind, outcome and tenant; requested and granted amounts
    by resource dimension. Uses the global meter provider unless given one.

    Counts are summed in process and read by the SDK at collection time
    (observable counters): an SDK counter's ``add`` costs microseconds, and a
    call would make several. Each instrument keeps at most ``max_series``
    label sets; further ones are summed into one overflow series, as the
    SDK's own cardinality limit does.
    """

    def __init__(
        self, meter_provider: metrics.MeterProvider | None = None, *, max_series: int = 2000
    ) -> None:
        self._lock = threading.Lock()
        self._max_series = max_series
        self._sums: tuple[dict[tuple[str, str, str], int], ...] = ({}, {}, {})
        meter = metrics.get_meter("envelope_grpc", meter_provider=meter_provider)
        for index, (name, unit, description, label) in enumerate(
            (
                (k.METRIC_ADMISSIONS, "{call}", "Admission decisions by kind, tenant, outcome.", "outcome"),
                (k.METRIC_REQUESTED, "1", "Requested resource amounts by dimension.", "dimension"),
                (k.METRIC_GRANTED, "1", "Granted resource amounts by dimension.", "dimension"),
            )
        ):
            meter.create_observable_counter(
                name, callbacks=[self._observer(index, label)], unit=unit, description=description
            )

    def _observer(self, index: int, label: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        key = f"{k.NAMESPACE}.{label}"

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                sums = list(self._sums[index].items())
            for (kind, tenant, value), total in sums:
                if kind == _OVERFLOW:
                    yield Observation(total, {"otel.metric.overflow": True})
                else:
                    yield Observation(total, {_KIND: kind, _TENANT: tenant, key: value})

        return observe

    def record(self, env: ExecutionEnvelope) -> None:
        """Count one admission decision and its resource amounts."""
        kind = KIND_NAMES[env.execution.kind]
        tenant = env.principal.tenant
        requested = _quantities(env.requested)
        grants = env.grants
        if not grants:
            granted: list[tuple[str, int]] = []
        elif grants[-1].outcome == OUTCOME_ADMITTED:  # granted as asked
            granted = requested
        else:
            granted = _quantities(grants[-1].resources)
        with self._lock:
            self._add(0, (kind, tenant, OUTCOME_NAMES[env.decision.outcome]), 1)
            for name, value in requested:
                self._add(1, (kind, tenant, name), value)
            for name, value in granted:
                self._add(2, (kind, tenant, name), value)

    def _add(self, index: int, key: tuple[str, str, str], value: int) -> None:
        sums = self._sums[index]
        if key not in sums and len(sums) >= self._max_series:
            key = _OVERFLOW_KEY
        sums[key] = sums.get(key, 0) + value


def _quantities(resources: Resources) -> list[tuple[str, int]]:
    return [(field.name, value) for field, value in resources.ListFields() if field.name in QUANTITIES]


_KIND: Final = f"{k.NAMESPACE}.kind"
_TENANT: Final = f"{k.NAMESPACE}.tenant"
_OVERFLOW: Final = "\0overflow"  # no kind is named so
_OVERFLOW_KEY: Final = (_OVERFLOW, "", "")
