"""OpenTelemetry output: span attributes, lifecycle span events, metrics.

Attributes are set in one ``set_attributes`` call from the key table in
_constants; nothing is computed for a span that is not recording. A call's
span is told from its envelope's facts and its Progress, which comes from the
envelope when it was built in full, or from the call's plain values when not.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Final, NamedTuple

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from envelope_grpc import _constants as k
from envelope_grpc._envelope import ADMITTED, COMPLETED, NORMALIZED, RECEIVED, REJECTED
from envelope_grpc._values import OUTCOME_ADMITTED, enum_names
from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    Binding,
    DataClassification,
    DecisionOutcome,
    EnforcementMode,
    EnvelopeFlag,
    ExecutionEnvelope,
    ExecutionKind,
    LifecycleState,
    PrincipalKind,
    Resources,
    Usage,
)

KIND_NAMES: Final = enum_names(ExecutionKind.DESCRIPTOR)
OUTCOME_NAMES: Final = enum_names(DecisionOutcome.DESCRIPTOR)
STATE_NAMES: Final = enum_names(LifecycleState.DESCRIPTOR)
PRINCIPAL_NAMES: Final = enum_names(PrincipalKind.DESCRIPTOR)
AUTH_NAMES: Final = enum_names(AuthMethod.DESCRIPTOR)
CLASSIFICATION_NAMES: Final = enum_names(DataClassification.DESCRIPTOR)
MODE_NAMES: Final = enum_names(EnforcementMode.DESCRIPTOR)
FLAG_NAMES: Final = enum_names(EnvelopeFlag.DESCRIPTOR)


def _keys(prefix: str, message: Descriptor) -> dict[str, str]:
    """The attribute key of each field of ``message``, under ``prefix``."""
    return {field.name: prefix + field.name for field in message.fields}


_REQUESTED_KEYS: Final = _keys(k.ATTR_REQUESTED_PREFIX, Resources.DESCRIPTOR)
_GRANTED_KEYS: Final = _keys(k.ATTR_GRANTED_PREFIX, Resources.DESCRIPTOR)
_USAGE_KEYS: Final = _keys(k.ATTR_USAGE_PREFIX, Usage.DESCRIPTOR)


def _fields(out: dict[str, AttributeValue], keys: dict[str, str], message: Message) -> None:
    for field, value in message.ListFields():
        out[keys[field.name]] = value


class Progress(NamedTuple):
    """What became of a call after its facts, as its span tells it."""

    state: int
    #: The admission decision: outcome, deciding policy, reason, mode (None
    #: when no policy ran), and whether a policy failed open.
    outcome: int
    policy: str
    reason: str
    mode: int | None
    fail_open: bool
    #: The resources of the last grant, when they differ from the request.
    granted: Resources | None
    #: Usage as (field name, value), and whether either side streamed.
    usage: Sequence[tuple[str, int]]
    streamed: bool
    binding: Binding | None
    #: The lifecycle: (state, actor, reason, ns) per step, from ``start_ns``.
    steps: Sequence[tuple[int, str, str, int]]
    start_ns: int
    #: The span's error status text (a rejected call), or empty.
    error: str


def progress(env: ExecutionEnvelope) -> Progress:
    """The progress a whole envelope records."""
    decision = env.decision
    lifecycle = env.lifecycle
    outcome = env.outcome
    grants = env.grants
    usage = outcome.usage
    rejected = lifecycle.state == REJECTED
    return Progress(
        state=lifecycle.state,
        outcome=decision.outcome,
        policy=decision.deciding_policy,
        reason=decision.reason_code or outcome.reason_code,
        mode=decision.mode if decision.policies else None,
        fail_open=decision.fail_open,
        granted=grants[-1].resources if grants and grants[-1].outcome != OUTCOME_ADMITTED else None,
        usage=[(field.name, value) for field, value in usage.ListFields()],
        streamed=usage.request_messages > 1 or usage.response_messages > 1,
        binding=env.binding if env.HasField("binding") else None,
        steps=[
            (step.to, step.actor, step.reason, step.time.ToNanoseconds()) for step in lifecycle.transitions
        ],
        start_ns=lifecycle.start_time.ToNanoseconds(),
        error=f"{outcome.reason_code}: {outcome.status_message}" if rejected else "",
    )


def attributes(env: ExecutionEnvelope, done: Progress) -> dict[str, AttributeValue]:
    """The call as ``execution_envelope.*`` span attributes (set values only):
    the facts from ``env``, the rest from ``done``."""
    execution = env.execution
    principal = env.principal
    target = execution.target
    scope = env.scope
    out: dict[str, AttributeValue] = {
        k.ATTR_ID: env.envelope_id,
        k.ATTR_REQUEST_ID: env.request_id,
        k.ATTR_KIND: KIND_NAMES[execution.kind],
        k.ATTR_STATE: STATE_NAMES[done.state],
        k.ATTR_OUTCOME: OUTCOME_NAMES[done.outcome],
        k.ATTR_PRINCIPAL_KIND: PRINCIPAL_NAMES[principal.kind],
        k.ATTR_AUTH: AUTH_NAMES[principal.auth_method],
    }
    if env.HasField("lineage"):
        lineage = env.lineage
        out[k.ATTR_PARENT_ID] = lineage.parent_envelope_id
        out[k.ATTR_ROOT_ID] = lineage.root_envelope_id
        out[k.ATTR_DEPTH] = lineage.depth
    for key, value in (
        (k.ATTR_TARGET_TYPE, target.type),
        (k.ATTR_TARGET_NAME, target.name),
        (k.ATTR_TARGET_VERSION, target.version),
        (k.ATTR_SUBJECT, principal.subject),
        (k.ATTR_TENANT, principal.tenant),
        (k.ATTR_PROJECT, principal.project),
        (k.ATTR_REGION, scope.region),
        (k.ATTR_POLICY, done.policy),
        (k.ATTR_REASON, done.reason),
    ):
        if value:
            out[key] = value
    if done.binding is not None:
        binding = done.binding
        if binding.node:
            out[k.ATTR_BINDING_NODE] = binding.node
        if binding.endpoint:
            out[k.ATTR_BINDING_ENDPOINT] = binding.endpoint
    if scope.data_classification:
        out[k.ATTR_CLASSIFICATION] = CLASSIFICATION_NAMES[scope.data_classification]
    if done.mode is not None:
        out[k.ATTR_MODE] = MODE_NAMES[done.mode]
    if done.fail_open:
        out[k.ATTR_FAIL_OPEN] = True
    if env.flags:
        out[k.ATTR_FLAGS] = [FLAG_NAMES[flag] for flag in env.flags]
    _fields(out, _REQUESTED_KEYS, env.requested)
    if done.granted is not None:  # else as asked: requested says it all
        _fields(out, _GRANTED_KEYS, done.granted)
    streamed = done.streamed
    for name, used in done.usage:
        if streamed or name not in _STREAM_USAGE:
            out[_USAGE_KEYS[name]] = used
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


def annotate(span: trace.Span, env: ExecutionEnvelope, done: Progress) -> None:
    """Put the call on a recording ``span``: its attributes, the lifecycle
    path (each state with its offset from receipt in microseconds), a span
    event for every step that says more than the path (a reason, a backend
    step, an end other than completion), and an error status when the call
    was rejected. The caller checks that the span records, before it builds
    ``done``."""
    out = attributes(env, done)
    start_ns = done.start_ns
    path: list[str] = []
    for to, actor, reason, ns in done.steps:
        path.append(_STEP_PREFIXES[to] + str((ns - start_ns) // 1000))
        # A span event costs ~5 µs: the plain steps are told by the path alone.
        if reason or to not in _PLAIN_STEPS:
            event = {"actor": actor, "reason": reason} if reason else {"actor": actor}
            span.add_event(_EVENT_NAMES[to], event, timestamp=ns)
    # One string, not two lists: a list attribute costs the SDK several times more.
    out[k.ATTR_LIFECYCLE] = " ".join(path)
    span.set_attributes(out)
    if done.error:
        span.set_status(Status(StatusCode.ERROR, done.error))


#: Resource amounts as (dimension name, value).
_Amounts = Sequence[tuple[str, int]]


class _Tally:
    """The admission counts of one meter provider, summed over every
    interceptor that reports to it (the SDK keeps only the first instrument
    of a name, so each interceptor cannot have its own)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None, max_series: int) -> None:
        self.lock = threading.Lock()
        self.max_series = max_series
        # Appends and pops of a deque are atomic: calls queue without a lock.
        self.queued: collections.deque[tuple[int, str, int, _Amounts, _Amounts]] = collections.deque()
        # Keyed by (kind, tenant, outcome or dimension name), as numbers where
        # the contract has them: names are looked up at collection.
        self.sums: tuple[dict[tuple[int, str, int | str], int], ...] = ({}, {}, {})
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
            with self.lock:
                self.fold()
                sums = list(self.sums[index].items())
            for (kind, tenant, value), total in sums:
                if kind == _OVERFLOW:
                    yield Observation(total, {"otel.metric.overflow": True})
                else:
                    name = OUTCOME_NAMES[value] if isinstance(value, int) else value
                    kind_name = KIND_NAMES.get(kind, str(kind))  # a kind the contract does not name
                    yield Observation(total, {_KIND: kind_name, _TENANT: tenant, key: name})

        return observe

    def fold(self) -> None:
        """Sum the queued decisions (the lock held)."""
        queued = self.queued
        while True:
            try:
                kind, tenant, outcome, requested, granted = queued.popleft()
            except IndexError:
                return
            self._add(0, (kind, tenant, outcome), 1)
            for name, value in requested:
                self._add(1, (kind, tenant, name), value)
            for name, value in granted:
                self._add(2, (kind, tenant, name), value)

    def _add(self, index: int, key: tuple[int, str, int | str], value: int) -> None:
        sums = self.sums[index]
        if key not in sums and len(sums) >= self.max_series:
            key = _OVERFLOW_KEY
        sums[key] = sums.get(key, 0) + value


class _Global:
    """Stands for the global meter provider, whichever it is when counts are read."""


_GLOBAL: Final = _Global()
_TALLIES: Final[weakref.WeakKeyDictionary[object, _Tally]] = weakref.WeakKeyDictionary()
_TALLIES_LOCK: Final = threading.Lock()


class Metrics:
    """Admissions by kind, outcome and tenant; requested and granted amounts
    by resource dimension. Uses the global meter provider unless given one.

    Counts are summed in process and read by the SDK at collection time
    (observable counters): an SDK counter's ``add`` costs microseconds, and a
    call would make several. A call only queues what it decided; the queue
    is summed in batches, at collection or once it holds ``fold_every``
    decisions. Every interceptor that reports to one meter provider adds to
    the same counts. Each instrument keeps at most ``max_series`` label sets
    (as the first interceptor of a provider set it); further ones are summed
    into one overflow series, as the SDK's own cardinality limit does.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        max_series: int = 2000,
        fold_every: int = 256,
    ) -> None:
        # One tally for the global provider, made before or after it is set
        # (the API's proxy hands its instruments on to the SDK's provider).
        global_ = meter_provider is None or meter_provider is metrics.get_meter_provider()
        key: object = _GLOBAL if global_ else meter_provider
        with _TALLIES_LOCK:
            tally = _TALLIES.get(key)
            if tally is None:
                tally = _TALLIES[key] = _Tally(None if global_ else meter_provider, max_series)
        self._tally = tally
        self._queued = tally.queued
        self._fold_every = fold_every

    def record(
        self, kind: int, tenant: str, outcome: int, requested: Resources, grant: Resources | None
    ) -> None:
        """Count one admission decision (``outcome``) of a ``kind`` call by
        ``tenant``: the resources requested and granted (``grant``; None when
        nothing was)."""
        amounts = _quantities(requested)
        if grant is None:
            granted: _Amounts = ()
        elif outcome == OUTCOME_ADMITTED:  # granted as asked
            granted = amounts
        else:
            granted = _quantities(grant)
        queued = self._queued
        queued.append((kind, tenant, outcome, amounts, granted))
        if len(queued) >= self._fold_every:
            with self._tally.lock:
                self._tally.fold()


def _quantities(resources: Resources) -> _Amounts:
    # Every resource field but the accelerator type is a quantity.
    return [(field.name, value) for field, value in resources.ListFields() if value.__class__ is int]


_KIND: Final = f"{k.NAMESPACE}.kind"
_TENANT: Final = f"{k.NAMESPACE}.tenant"
_OVERFLOW: Final = -1  # no kind is numbered so
_OVERFLOW_KEY: Final = (_OVERFLOW, "", "")
