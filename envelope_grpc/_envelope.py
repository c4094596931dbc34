"""The envelope model: make, step through the lifecycle, record, validate.

Pure functions over the generated ``ExecutionEnvelope`` message; no gRPC.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

import protovalidate
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from envelope_grpc._constants import ACTOR_ADMISSION, ACTOR_BACKEND, ACTOR_RECEIVER
from envelope_grpc._values import (
    DIMENSION_ACCELERATOR_TYPE,
    OUTCOME_ADJUSTED,
    OUTCOME_ADMITTED,
    OUTCOME_NARROWED,
    OUTCOME_WIDENED,
    STAGE_ADMISSION,
    STAGE_BACKEND,
)
from envelope_grpc.v1.envelope_pb2 import (
    Binding,
    DecisionOutcome,
    Execution,
    ExecutionEnvelope,
    GrantStage,
    Lifecycle,
    LifecycleState,
    ResourceDimension,
    Resources,
    Usage,
)

SCHEMA_VERSION: Final = "1.0"

S = LifecycleState
UNSPECIFIED: Final = S.LIFECYCLE_STATE_UNSPECIFIED
RECEIVED: Final = S.LIFECYCLE_STATE_RECEIVED
NORMALIZED: Final = S.LIFECYCLE_STATE_NORMALIZED
ADMITTED: Final = S.LIFECYCLE_STATE_ADMITTED
GRANTED: Final = S.LIFECYCLE_STATE_GRANTED
BOUND: Final = S.LIFECYCLE_STATE_BOUND
COMPLETED: Final = S.LIFECYCLE_STATE_COMPLETED
FAILED: Final = S.LIFECYCLE_STATE_FAILED
CANCELLED: Final = S.LIFECYCLE_STATE_CANCELLED
REJECTED: Final = S.LIFECYCLE_STATE_REJECTED

TERMINAL: Final = frozenset({COMPLETED, FAILED, CANCELLED, REJECTED})
_LIVE: Final = frozenset({RECEIVED, NORMALIZED, ADMITTED, GRANTED, BOUND})
_ENDS: Final = frozenset({FAILED, CANCELLED})

#: Every legal lifecycle move, as documented on ``LifecycleState``.
_State: TypeAlias = LifecycleState.ValueType
LEGAL_TRANSITIONS: Final[Mapping[_State, frozenset[_State]]] = {
    S.LIFECYCLE_STATE_UNSPECIFIED: frozenset({RECEIVED}),
    RECEIVED: frozenset({NORMALIZED}) | _ENDS,
    NORMALIZED: frozenset({ADMITTED, REJECTED}) | _ENDS,
    ADMITTED: frozenset({GRANTED, BOUND, COMPLETED, REJECTED}) | _ENDS,
    GRANTED: frozenset({BOUND, COMPLETED}) | _ENDS,
    BOUND: frozenset({COMPLETED}) | _ENDS,
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    REJECTED: frozenset(),
}

#: Resource dimensions that hold a quantity, by field name.
# Keys typed Any: the generated stubs accept only literal field names.
QUANTITIES: Final[Mapping[Any, int]] = {
    "accelerator_count": ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT,
    "accelerator_memory_bytes": ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_MEMORY_BYTES,
    "cpu_millis": ResourceDimension.RESOURCE_DIMENSION_CPU_MILLIS,
    "memory_bytes": ResourceDimension.RESOURCE_DIMENSION_MEMORY_BYTES,
    "replicas_min": ResourceDimension.RESOURCE_DIMENSION_REPLICAS_MIN,
    "replicas_start": ResourceDimension.RESOURCE_DIMENSION_REPLICAS_START,
    "replicas_max": ResourceDimension.RESOURCE_DIMENSION_REPLICAS_MAX,
    "concurrency": ResourceDimension.RESOURCE_DIMENSION_CONCURRENCY,
    "tokens": ResourceDimension.RESOURCE_DIMENSION_TOKENS,
    "bytes": ResourceDimension.RESOURCE_DIMENSION_BYTES,
    "duration_ms": ResourceDimension.RESOURCE_DIMENSION_DURATION_MS,
}
#: Field name of every quantity dimension.
QUANTITY_FIELDS: Final[Mapping[int, Any]] = {dim: name for name, dim in QUANTITIES.items()}
#: Field name of every resource dimension.
DIMENSION_FIELDS: Final[Mapping[int, Any]] = {
    **QUANTITY_FIELDS,
    DIMENSION_ACCELERATOR_TYPE: "accelerator_type",
}


class LifecycleError(ValueError):
    """A lifecycle step that the envelope's current state does not allow."""

    def __init__(self, current: _State, target: _State, what: str = "") -> None:
        self.current = current
        self.target = target
        doing = what or f"move to {S.Name(target)}"
        super().__init__(f"cannot {doing}: the envelope is {S.Name(current)}")


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: its stable id, the field path it concerns, and a message."""

    rule_id: str
    field: str
    message: str


# Ids only need to be unique, never secret (an envelope is no authority):
# a generator seeded from the OS, so that a call makes no system call that
# would hand the GIL to another thread mid-admission (os.urandom does).
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))  # no shared ids after fork


_REASON_CODE: Final = re.compile(r"[A-Z][A-Z0-9_]*")


def is_reason_code(text: str) -> bool:
    """Whether ``text`` is a machine reason code as the contract has them (LIKE_THIS)."""
    return _REASON_CODE.fullmatch(text) is not None


def new_id() -> str:
    """A fresh envelope id: 32 lowercase hex digits (128 random bits)."""
    return f"{_ids.getrandbits(128):032x}"


def stamp(timestamp: Timestamp, ns: int) -> None:
    """Set a Timestamp from nanoseconds since the epoch (faster than FromNanoseconds)."""
    timestamp.seconds, timestamp.nanos = divmod(ns, 1_000_000_000)


def blank_envelope(method: str, *, request_id: str = "", envelope_id: str = "") -> ExecutionEnvelope:
    """An envelope for a call of ``method`` with its ids and no lifecycle yet."""
    return ExecutionEnvelope(
        envelope_id=envelope_id or new_id(),
        schema_version=SCHEMA_VERSION,
        request_id=request_id or new_id(),
        execution=Execution(method=method),
    )


def new_envelope(
    method: str,
    *,
    request_id: str = "",
    envelope_id: str = "",
    actor: str = ACTOR_RECEIVER,
    now_ns: int | None = None,
) -> ExecutionEnvelope:
    """An envelope in state RECEIVED for a call of ``method``."""
    env = blank_envelope(method, request_id=request_id, envelope_id=envelope_id)
    now = time.time_ns() if now_ns is None else now_ns
    lifecycle = env.lifecycle
    stamp(lifecycle.start_time, now)
    write_step(lifecycle, S.LIFECYCLE_STATE_UNSPECIFIED, RECEIVED, actor, "", now)
    return env


def is_terminal(env: ExecutionEnvelope) -> bool:
    """Whether the envelope is frozen."""
    return env.lifecycle.state in TERMINAL


def transition(
    env: ExecutionEnvelope, to: _State, *, actor: str, reason: str = "", now_ns: int | None = None
) -> None:
    """Move the envelope to ``to``, recording time, actor and reason.

    Raises LifecycleError, naming both states, for a move the lifecycle does
    not allow.
    """
    lifecycle = env.lifecycle
    current = lifecycle.state
    if to not in LEGAL_TRANSITIONS[current]:
        raise LifecycleError(current, to)
    write_step(lifecycle, current, to, actor, reason, time.time_ns() if now_ns is None else now_ns)


def write_step(lifecycle: Lifecycle, current: _State, to: _State, actor: str, reason: str, now: int) -> None:
    """Append the step ``current`` -> ``to`` unchecked: for moves already known legal."""
    step = lifecycle.transitions.add(to=to, actor=actor)
    stamp(step.time, now)
    if current:
        step.__setattr__("from", current)
    if reason:
        step.reason = reason
    lifecycle.state = to
    if to in TERMINAL:
        stamp(lifecycle.end_time, now)


def _require(env: ExecutionEnvelope, allowed: Iterable[_State], what: str) -> None:
    current = env.lifecycle.state
    if current not in allowed:
        raise LifecycleError(current, current, what)


def record_requested(env: ExecutionEnvelope, resources: Resources) -> None:
    """Write the caller's original ask; allowed once, before NORMALIZED."""
    _require(env, (RECEIVED,), "record requested resources")
    if env.HasField("requested"):
        raise LifecycleError(env.lifecycle.state, env.lifecycle.state, "record requested resources twice")
    env.requested.CopyFrom(resources)


def compare(requested: Resources, granted: Resources) -> DecisionOutcome.ValueType:
    """How ``granted`` compares with ``requested``: a DecisionOutcome.

    ADMITTED when equal; NARROWED when some dimension is lower or dropped and
    none higher; WIDENED when some dimension is higher or filled in and none
    lower; ADJUSTED when both, or when the accelerator type was substituted.
    """
    if requested == granted:
        return OUTCOME_ADMITTED
    narrowed = widened = False
    for name in QUANTITIES:
        asked = requested.HasField(name)
        got = granted.HasField(name)
        if asked and (not got or getattr(granted, name) < getattr(requested, name)):
            narrowed = True
        elif got and (not asked or getattr(granted, name) > getattr(requested, name)):
            widened = True
    if granted.accelerator_type != requested.accelerator_type:
        narrowed = narrowed or bool(requested.accelerator_type)
        widened = widened or bool(granted.accelerator_type)
    if narrowed and widened:
        return OUTCOME_ADJUSTED
    if narrowed:
        return OUTCOME_NARROWED
    if widened:
        return OUTCOME_WIDENED
    return OUTCOME_ADMITTED


def write_grant(
    env: ExecutionEnvelope,
    stage: GrantStage.ValueType,
    resources: Resources,
    *,
    reason_code: str,
    reason: str,
    actor: str,
    now_ns: int | None,
) -> int:
    """Append a grant of ``stage`` with its outcome against the request, with
    no lifecycle check; returns the outcome."""
    outcome = compare(env.requested, resources)
    if outcome != OUTCOME_ADMITTED and not (reason_code and reason):
        raise ValueError(f"a grant that is {DecisionOutcome.Name(outcome)} needs a reason_code and a reason")
    grant = env.grants.add(stage=stage, outcome=outcome, actor=actor)
    grant.resources.CopyFrom(resources)
    if outcome != OUTCOME_ADMITTED:
        grant.reason_code = reason_code
        grant.reason = reason
    stamp(grant.time, time.time_ns() if now_ns is None else now_ns)
    return outcome


def record_admission_grant(
    env: ExecutionEnvelope,
    resources: Resources,
    *,
    reason_code: str = "",
    reason: str = "",
    actor: str = ACTOR_ADMISSION,
    now_ns: int | None = None,
) -> int:
    """Write admission's grant (before the ADMITTED step); returns its outcome."""
    _require(env, (NORMALIZED,), "record an admission grant")
    if env.grants:
        raise LifecycleError(env.lifecycle.state, env.lifecycle.state, "record a second admission grant")
    return write_grant(
        env,
        STAGE_ADMISSION,
        resources,
        reason_code=reason_code,
        reason=reason,
        actor=actor,
        now_ns=now_ns,
    )


def record_grant(
    env: ExecutionEnvelope,
    resources: Resources,
    *,
    reason_code: str = "",
    reason: str = "",
    actor: str = ACTOR_BACKEND,
    now_ns: int | None = None,
) -> int:
    """Record the backend's final grant and move to GRANTED; returns its outcome.

    A grant that differs from the request needs a reason code and a reason.
    """
    _require(env, (ADMITTED,), "record the backend's grant")
    outcome = write_grant(
        env,
        STAGE_BACKEND,
        resources,
        reason_code=reason_code,
        reason=reason,
        actor=actor,
        now_ns=now_ns,
    )
    transition(env, GRANTED, actor=actor, reason=reason_code, now_ns=now_ns)
    return outcome


def record_binding(
    env: ExecutionEnvelope,
    binding: Binding,
    *,
    actor: str = ACTOR_BACKEND,
    now_ns: int | None = None,
) -> None:
    """Record placement and routing and move to BOUND."""
    _require(env, (ADMITTED, GRANTED), "record a binding")
    env.binding.CopyFrom(binding)
    transition(env, BOUND, actor=actor, now_ns=now_ns)


def record_usage(env: ExecutionEnvelope, usage: Usage) -> None:
    """Merge actual usage into the outcome; allowed until the envelope ends."""
    _require(env, (ADMITTED, GRANTED, BOUND), "record usage")
    env.outcome.usage.MergeFrom(usage)


def record_failure(env: ExecutionEnvelope, reason_code: str) -> None:
    """Record why the backend fails the call (``reason_code``, LIKE_THIS);
    allowed until the envelope ends, which it then does FAILED."""
    _require(env, _LIVE, "fail an envelope that has ended")
    if not is_reason_code(reason_code):
        raise ValueError(f"a reason code is like MODEL_UNAVAILABLE, not {reason_code!r}")
    env.outcome.reason_code = reason_code


def reject(
    env: ExecutionEnvelope,
    reason_code: str,
    message: str,
    *,
    status_code: int,
    actor: str,
    now_ns: int | None = None,
) -> None:
    """Move to REJECTED with a reason; a backend grant or binding may not exist.

    ``reason_code`` is machine-readable (LIKE_THIS); ``message`` is cut to the
    contract's 1024 characters; ``status_code`` cannot be OK (0)."""
    if not is_reason_code(reason_code):
        raise ValueError(f"a reason code is like INSUFFICIENT_CAPACITY, not {reason_code!r}")
    if status_code == 0:
        raise ValueError("a rejection cannot carry status OK")
    message = message[:1024]
    if any(g.stage == STAGE_BACKEND for g in env.grants) or env.HasField("binding"):
        raise LifecycleError(env.lifecycle.state, REJECTED, "reject an envelope that holds a backend grant")
    if REJECTED not in LEGAL_TRANSITIONS[env.lifecycle.state]:
        raise LifecycleError(env.lifecycle.state, REJECTED)
    env.outcome.reason_code = reason_code
    env.outcome.status_code = status_code
    env.outcome.status_message = message
    transition(env, REJECTED, actor=actor, reason=reason_code, now_ns=now_ns)


# -- validation ---------------------------------------------------------------

_validator = protovalidate.Validator()


def _path(field: object) -> str:
    """Render a protovalidate FieldPath as "a.b[0].c" or "a.b[key]"."""
    parts: list[str] = []
    for element in getattr(field, "elements", None) or ():
        part = element.field_name
        subscript = element.subscript
        if subscript is not None:
            part += f"[{subscript.value}]"
        parts.append(part)
    return ".".join(parts)


def _name(state: int) -> str:
    return S.Name(state) if state in S.values() else str(state)  # type: ignore[arg-type]


def replay(env: ExecutionEnvelope) -> list[Violation]:
    """The core's own rules, which CEL cannot express: the transition list
    replays from UNSPECIFIED through legal moves only, in time order."""
    violations: list[Violation] = []
    current = S.LIFECYCLE_STATE_UNSPECIFIED
    last_ns: int | None = None
    for i, step in enumerate(env.lifecycle.transitions):
        where = f"lifecycle.transitions[{i}]"
        source = getattr(step, "from")
        if source != current:
            violations.append(
                Violation(
                    "lifecycle.broken_chain",
                    where,
                    f"starts from {_name(source)} but the envelope was {_name(current)}",
                )
            )
        elif step.to not in LEGAL_TRANSITIONS.get(current, frozenset()):
            violations.append(
                Violation(
                    "lifecycle.illegal_transition",
                    where,
                    f"{_name(current)} -> {_name(step.to)} is not a legal move",
                )
            )
        ns = step.time.ToNanoseconds()
        if last_ns is not None and ns < last_ns:
            violations.append(Violation("lifecycle.time_goes_back", where, "is earlier than the step before"))
        last_ns = ns if last_ns is None else max(last_ns, ns)
        current = step.to
    return violations


def validate(env: ExecutionEnvelope) -> list[Violation]:
    """Every broken rule of the contract (protovalidate) and of the core."""
    found = [
        Violation(v.proto.rule_id, _path(v.proto.field), v.proto.message)
        for v in _validator.collect_violations(env)
    ]
    return found + replay(env)


# -- proto3 JSON ----------------------------------------------------------------


def to_json(env: ExecutionEnvelope, *, indent: int | None = None) -> str:
    """The envelope in proto3 JSON (lowerCamelCase names, enum names)."""
    return json_format.MessageToJson(env, indent=indent)


def from_json(text: str) -> ExecutionEnvelope:
    """Parse proto3 JSON into an envelope; unknown fields are an error."""
    return json_format.Parse(text, ExecutionEnvelope())
