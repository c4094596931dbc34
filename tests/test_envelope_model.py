"""Exact unit tests of the pure-Python envelope model (no gRPC, no sockets)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import json_format

from envelope_grpc._envelope import (
    ADMITTED,
    BOUND,
    CANCELLED,
    COMPLETED,
    FAILED,
    GRANTED,
    LEGAL_TRANSITIONS,
    NORMALIZED,
    QUANTITIES,
    RECEIVED,
    REJECTED,
    SCHEMA_VERSION,
    TERMINAL,
    LifecycleError,
    compare,
    from_json,
    new_envelope,
    record_admission_grant,
    record_binding,
    record_failure,
    record_grant,
    record_requested,
    record_usage,
    reject,
    replay,
    to_json,
    transition,
    validate,
)
from envelope_grpc.v1 import envelope_pb2
from envelope_grpc.v1.envelope_pb2 import (
    Binding,
    DecisionOutcome,
    DenialBasis,
    ExecutionEnvelope,
    GrantStage,
    LifecycleState,
    Resources,
    Usage,
)

S = LifecycleState
DO = DecisionOutcome
UNSPECIFIED = S.LIFECYCLE_STATE_UNSPECIFIED
ALL_STATES = tuple(S.values())

METHOD = "/deploy.v1.ModelDeployer/Deploy"
ENVELOPE_ID = "5b1f0c9e2d7a4e83b6c15f0a9d2e7c41"
T0 = 1_748_855_643_000_000_000  # 2025-06-02T09:14:03Z
MS = 1_000_000

REQUESTED = Resources(
    accelerator_count=4, accelerator_type="nvidia-a100-80gb", replicas_min=0, replicas_start=1, tokens=0
)
#: Fewer accelerators than asked: NARROWED.
ADMISSION_GRANT = Resources(
    accelerator_count=2, accelerator_type="nvidia-a100-80gb", replicas_min=0, replicas_start=1, tokens=0
)
#: Fewer accelerators of another type: ADJUSTED.
BACKEND_GRANT = Resources(
    accelerator_count=2, accelerator_type="nvidia-h100-80gb", replicas_min=0, replicas_start=1, tokens=0
)
BINDING = Binding(
    node="gpu-pool-b/node-12", accelerator_indexes=[0, 1], runtime="vllm", endpoint="10.0.0.5:8001"
)


def _name(state: int) -> str:
    return S.Name(state).removeprefix("LIFECYCLE_STATE_")


def _fresh() -> ExecutionEnvelope:
    return new_envelope(METHOD, request_id="req-1", envelope_id=ENVELOPE_ID, now_ns=T0)


def _snapshot(env: ExecutionEnvelope) -> bytes:
    return env.SerializeToString(deterministic=True)


# -- paths through the lifecycle -----------------------------------------------


def _all_paths() -> list[tuple[int, ...]]:
    """Every path from RECEIVED to a terminal state, following LEGAL_TRANSITIONS."""
    found: list[tuple[int, ...]] = []

    def walk(path: tuple[int, ...]) -> None:
        if path[-1] in TERMINAL:
            found.append(path)
            return
        for nxt in sorted(LEGAL_TRANSITIONS[path[-1]]):
            assert nxt not in path, "the lifecycle has a cycle"
            walk((*path, nxt))

    walk((RECEIVED,))
    return found


PATHS = _all_paths()


def _path_id(path: tuple[int, ...]) -> str:
    return "->".join(_name(s) for s in path)


def _advance(env: ExecutionEnvelope, to: int, now_ns: int) -> None:
    """Take one lifecycle step, recording the data the rules require for it."""
    current = env.lifecycle.state
    if to == NORMALIZED:
        record_requested(env, REQUESTED)
        transition(env, NORMALIZED, actor="extractor", now_ns=now_ns)
    elif to == ADMITTED:
        outcome = record_admission_grant(
            env,
            ADMISSION_GRANT,
            reason_code="ACCELERATOR_QUOTA",
            reason="at most 2 accelerators per replica",
            actor="gpu-quota",
            now_ns=now_ns,
        )
        assert outcome == DO.DECISION_OUTCOME_NARROWED
        env.decision.outcome = outcome
        env.decision.deciding_policy = "gpu-quota"
        env.decision.reason_code = "ACCELERATOR_QUOTA"
        env.decision.message = "at most 2 accelerators per replica"
        transition(env, ADMITTED, actor="admission", now_ns=now_ns)
    elif to == GRANTED:
        outcome = record_grant(
            env,
            BACKEND_GRANT,
            reason_code="ACCELERATOR_SUBSTITUTED",
            reason="no A100 free; H100 granted",
            actor="k8s-deployer",
            now_ns=now_ns,
        )
        assert outcome == DO.DECISION_OUTCOME_ADJUSTED
    elif to == BOUND:
        record_binding(env, BINDING, actor="k8s-deployer", now_ns=now_ns)
    elif to == COMPLETED:
        record_usage(env, Usage(replicas_started=1, duration_ms=40))
        transition(env, COMPLETED, actor="completion", now_ns=now_ns)
    elif to == REJECTED:
        if current == NORMALIZED:
            env.decision.outcome = DO.DECISION_OUTCOME_DENIED
            env.decision.reason_code = "QUOTA_EXHAUSTED"
            env.decision.message = "no accelerator quota left"
            env.decision.denial_basis = DenialBasis.DENIAL_BASIS_EXHAUSTED
            reject(
                env,
                "QUOTA_EXHAUSTED",
                "no accelerator quota left",
                status_code=8,
                actor="admission",
                now_ns=now_ns,
            )
        else:
            reject(
                env, "NO_CAPACITY", "no node has 2 free GPUs", status_code=8, actor="backend", now_ns=now_ns
            )
    elif to == FAILED:
        env.outcome.status_code = 13
        env.outcome.reason_code = "ENGINE_CRASHED"
        transition(env, FAILED, actor="completion", reason="ENGINE_CRASHED", now_ns=now_ns)
    elif to == CANCELLED:
        env.outcome.status_code = 1
        env.outcome.reason_code = "CLIENT_CANCELLED"
        transition(env, CANCELLED, actor="completion", reason="CLIENT_CANCELLED", now_ns=now_ns)
    else:  # pragma: no cover - the paths only hold the states above
        raise AssertionError(f"no step to {S.Name(to)}")


def _build(path: tuple[int, ...]) -> ExecutionEnvelope:
    assert path[0] == RECEIVED
    env = _fresh()
    for i, to in enumerate(path[1:], start=1):
        _advance(env, to, T0 + i * MS)
    return env


def _in_state(state: int) -> ExecutionEnvelope:
    """An envelope in ``state``, built along the first path that reaches it."""
    if state == UNSPECIFIED:
        return ExecutionEnvelope()
    path = next(p for p in PATHS if state in p)
    return _build(path[: path.index(state) + 1])


def _raw(*states: int) -> ExecutionEnvelope:
    """A fresh envelope moved through ``states`` with bare transitions (no data)."""
    env = _fresh()
    for i, to in enumerate(states, start=1):
        transition(env, to, actor="test", now_ns=T0 + i * MS)
    return env


def test_paths_are_every_route_to_every_end() -> None:
    assert len(PATHS) == 18
    assert len(set(PATHS)) == 18
    assert {p[-1] for p in PATHS} == set(TERMINAL)
    assert (RECEIVED, NORMALIZED, ADMITTED, GRANTED, BOUND, COMPLETED) in PATHS
    assert (RECEIVED, NORMALIZED, REJECTED) in PATHS
    assert (RECEIVED, NORMALIZED, ADMITTED, REJECTED) in PATHS
    assert (RECEIVED, FAILED) in PATHS


@pytest.mark.parametrize("path", PATHS, ids=[_path_id(p) for p in PATHS])
def test_every_legal_path_validates_clean_at_every_step(path: tuple[int, ...]) -> None:
    env = _fresh()
    assert validate(env) == []
    for i, to in enumerate(path[1:], start=1):
        _advance(env, to, T0 + i * MS)
        assert validate(env) == [], f"after the step to {S.Name(to)}"

    lifecycle = env.lifecycle
    assert lifecycle.state == path[-1]
    assert [t.to for t in lifecycle.transitions] == list(path)
    assert [getattr(t, "from") for t in lifecycle.transitions] == [UNSPECIFIED, *path[:-1]]
    assert [t.time.ToNanoseconds() for t in lifecycle.transitions] == [T0 + i * MS for i in range(len(path))]
    assert all(t.actor for t in lifecycle.transitions)
    assert lifecycle.start_time.ToNanoseconds() == T0
    assert lifecycle.end_time.ToNanoseconds() == T0 + (len(path) - 1) * MS

    stages = [g.stage for g in env.grants]
    expected_stages = []
    if ADMITTED in path:
        expected_stages.append(GrantStage.GRANT_STAGE_ADMISSION)
    if GRANTED in path:
        expected_stages.append(GrantStage.GRANT_STAGE_BACKEND)
    assert stages == expected_stages
    assert env.HasField("binding") == (BOUND in path)
    assert env.HasField("requested") == (NORMALIZED in path)
    if path[-1] == REJECTED:
        assert env.outcome.reason_code in {"QUOTA_EXHAUSTED", "NO_CAPACITY"}
        assert env.outcome.status_code == 8
        assert lifecycle.transitions[-1].reason == env.outcome.reason_code


# -- illegal moves ---------------------------------------------------------------

ILLEGAL = [(a, b) for a in ALL_STATES for b in ALL_STATES if b not in LEGAL_TRANSITIONS[a]]
LEGAL = [(a, b) for a in ALL_STATES for b in sorted(LEGAL_TRANSITIONS[a])]


def test_legal_transitions_are_the_documented_moves() -> None:
    documented = {
        (UNSPECIFIED, RECEIVED),
        (RECEIVED, NORMALIZED),
        (NORMALIZED, ADMITTED),
        (ADMITTED, GRANTED),
        (GRANTED, BOUND),
        (ADMITTED, BOUND),
        (ADMITTED, COMPLETED),
        (GRANTED, COMPLETED),
        (BOUND, COMPLETED),
        (NORMALIZED, REJECTED),
        (ADMITTED, REJECTED),
    }
    for state in (RECEIVED, NORMALIZED, ADMITTED, GRANTED, BOUND):
        documented |= {(state, FAILED), (state, CANCELLED)}
    assert set(LEGAL) == documented
    assert set(LEGAL_TRANSITIONS) == set(ALL_STATES)
    assert len(ILLEGAL) == 100 - 21
    assert set(TERMINAL) == {COMPLETED, FAILED, CANCELLED, REJECTED}
    for state in TERMINAL:
        assert LEGAL_TRANSITIONS[state] == frozenset()


@pytest.mark.parametrize(("source", "target"), ILLEGAL, ids=[f"{_name(a)}->{_name(b)}" for a, b in ILLEGAL])
def test_illegal_move_raises_naming_both_states(source: int, target: int) -> None:
    env = _in_state(source)
    assert env.lifecycle.state == source
    before = _snapshot(env)
    with pytest.raises(LifecycleError) as info:
        transition(env, target, actor="test", now_ns=T0 + 99 * MS)
    message = str(info.value)
    assert S.Name(source) in message
    assert S.Name(target) in message
    assert info.value.current == source
    assert info.value.target == target
    assert isinstance(info.value, ValueError)
    assert _snapshot(env) == before


def test_completed_to_admitted_message() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED, COMPLETED))
    with pytest.raises(LifecycleError) as info:
        transition(env, ADMITTED, actor="admission")
    assert str(info.value) == (
        "cannot move to LIFECYCLE_STATE_ADMITTED: the envelope is LIFECYCLE_STATE_COMPLETED"
    )


@pytest.mark.parametrize(("source", "target"), LEGAL, ids=[f"{_name(a)}->{_name(b)}" for a, b in LEGAL])
def test_legal_move_records_the_step(source: int, target: int) -> None:
    env = _in_state(source)
    count = len(env.lifecycle.transitions)
    transition(env, target, actor="someone", reason="WHY", now_ns=T0 + 99 * MS)
    assert env.lifecycle.state == target
    assert len(env.lifecycle.transitions) == count + 1
    step = env.lifecycle.transitions[-1]
    assert getattr(step, "from") == source
    assert step.to == target
    assert step.actor == "someone"
    assert step.reason == "WHY"
    assert step.time.ToNanoseconds() == T0 + 99 * MS
    assert env.lifecycle.HasField("end_time") == (target in TERMINAL)
    if target in TERMINAL:
        assert env.lifecycle.end_time.ToNanoseconds() == T0 + 99 * MS


# -- terminal states are frozen --------------------------------------------------

FREEZERS: dict[str, Callable[[ExecutionEnvelope], object]] = {
    "record_requested": lambda e: record_requested(e, REQUESTED),
    "record_admission_grant": lambda e: record_admission_grant(e, REQUESTED),
    "record_grant": lambda e: record_grant(e, REQUESTED),
    "record_binding": lambda e: record_binding(e, BINDING),
    "record_usage": lambda e: record_usage(e, Usage(tokens=1)),
    "record_failure": lambda e: record_failure(e, "MODEL_UNAVAILABLE"),
    "transition_failed": lambda e: transition(e, FAILED, actor="x"),
    "transition_completed": lambda e: transition(e, COMPLETED, actor="x"),
}


@pytest.mark.parametrize("operation", sorted(FREEZERS))
@pytest.mark.parametrize("path", PATHS, ids=[_path_id(p) for p in PATHS])
def test_terminal_envelope_is_frozen(path: tuple[int, ...], operation: str) -> None:
    env = _build(path)
    before = _snapshot(env)
    with pytest.raises(LifecycleError) as info:
        FREEZERS[operation](env)
    assert S.Name(path[-1]) in str(info.value)
    assert _snapshot(env) == before


def test_record_failure_takes_a_reason_code_only() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED))
    with pytest.raises(ValueError, match="a reason code is like MODEL_UNAVAILABLE, not 'model down'"):
        record_failure(env, "model down")
    assert env.outcome.reason_code == ""
    record_failure(env, "MODEL_UNAVAILABLE")
    assert env.outcome.reason_code == "MODEL_UNAVAILABLE"


@pytest.mark.parametrize("path", PATHS, ids=[_path_id(p) for p in PATHS])
def test_reject_refuses_a_terminal_envelope(path: tuple[int, ...]) -> None:
    env = _build(path)
    with pytest.raises(LifecycleError) as info:
        reject(env, "TOO_LATE", "too late", status_code=9, actor="test")
    assert S.Name(path[-1]) in str(info.value)
    assert env.lifecycle.state == path[-1]


@pytest.mark.parametrize(
    "path", [(RECEIVED,), (RECEIVED, FAILED), (RECEIVED, NORMALIZED, ADMITTED, COMPLETED)]
)
def test_refused_reject_leaves_the_envelope_unchanged(path: tuple[int, ...]) -> None:
    env = _build(path)
    before = _snapshot(env)
    with pytest.raises(LifecycleError):
        reject(env, "TOO_LATE", "too late", status_code=9, actor="test")
    assert _snapshot(env) == before


# -- new_envelope ----------------------------------------------------------------


def test_new_envelope_fields() -> None:
    env = new_envelope(METHOD, request_id="req-42", envelope_id=ENVELOPE_ID, now_ns=T0 + 123)
    assert env.envelope_id == ENVELOPE_ID
    assert env.schema_version == SCHEMA_VERSION == "1.0"
    assert env.request_id == "req-42"
    assert env.execution.method == METHOD
    assert env.lifecycle.state == RECEIVED
    assert len(env.lifecycle.transitions) == 1
    step = env.lifecycle.transitions[0]
    assert getattr(step, "from") == UNSPECIFIED
    assert step.to == RECEIVED
    assert step.actor == "receiver"
    assert step.reason == ""
    assert step.time.ToNanoseconds() == T0 + 123
    assert env.lifecycle.start_time.ToNanoseconds() == T0 + 123
    assert not env.lifecycle.HasField("end_time")
    for name in ("requested", "decision", "binding", "outcome", "lineage", "principal", "scope"):
        assert not env.HasField(name), name
    assert list(env.grants) == []
    assert validate(env) == []


def test_new_envelope_generates_ids_and_time() -> None:
    before = time.time_ns()
    env = new_envelope(METHOD, actor="gateway")
    after = time.time_ns()
    assert re.fullmatch(r"[0-9a-f]{32}", env.envelope_id)
    assert re.fullmatch(r"[0-9a-f]{32}", env.request_id)
    assert env.request_id != env.envelope_id
    assert new_envelope(METHOD).envelope_id != env.envelope_id
    assert env.lifecycle.transitions[0].actor == "gateway"
    assert before <= env.lifecycle.start_time.ToNanoseconds() <= after
    assert env.lifecycle.start_time == env.lifecycle.transitions[0].time
    assert validate(env) == []


# -- record_* --------------------------------------------------------------------


def test_record_requested_once_in_received() -> None:
    env = _fresh()
    record_requested(env, REQUESTED)
    assert env.requested == REQUESTED
    with pytest.raises(LifecycleError) as info:
        record_requested(env, Resources(accelerator_count=1))
    assert str(info.value) == (
        "cannot record requested resources twice: the envelope is LIFECYCLE_STATE_RECEIVED"
    )
    assert env.requested == REQUESTED


def test_record_requested_empty_ask_still_counts_once() -> None:
    env = _fresh()
    record_requested(env, Resources())
    assert env.HasField("requested")
    with pytest.raises(LifecycleError):
        record_requested(env, REQUESTED)
    assert env.requested == Resources()


NOT_RECEIVED = [
    (NORMALIZED,),
    (NORMALIZED, ADMITTED),
    (NORMALIZED, ADMITTED, GRANTED),
    (NORMALIZED, ADMITTED, BOUND),
    (NORMALIZED, ADMITTED, COMPLETED),
    (NORMALIZED, REJECTED),
    (FAILED,),
    (CANCELLED,),
]


@pytest.mark.parametrize("states", NOT_RECEIVED, ids=[_name(s[-1]) + f"-{len(s)}" for s in NOT_RECEIVED])
def test_record_requested_only_in_received(states: tuple[int, ...]) -> None:
    env = _raw(*states)
    with pytest.raises(LifecycleError) as info:
        record_requested(env, REQUESTED)
    assert str(info.value) == f"cannot record requested resources: the envelope is {S.Name(states[-1])}"
    assert not env.HasField("requested")


def test_record_admission_grant_only_in_normalized_and_once() -> None:
    env = _fresh()
    record_requested(env, REQUESTED)
    with pytest.raises(LifecycleError):
        record_admission_grant(env, REQUESTED)
    transition(env, NORMALIZED, actor="extractor", now_ns=T0 + MS)
    assert record_admission_grant(env, REQUESTED, now_ns=T0 + 2 * MS) == DO.DECISION_OUTCOME_ADMITTED
    with pytest.raises(LifecycleError) as info:
        record_admission_grant(env, REQUESTED)
    assert "second admission grant" in str(info.value)
    assert len(env.grants) == 1
    grant = env.grants[0]
    assert grant.stage == GrantStage.GRANT_STAGE_ADMISSION
    assert grant.outcome == DO.DECISION_OUTCOME_ADMITTED
    assert grant.resources == REQUESTED
    assert grant.actor == "admission"
    assert grant.time.ToNanoseconds() == T0 + 2 * MS
    assert env.lifecycle.state == NORMALIZED


def test_equal_grant_drops_reason() -> None:
    env = _raw()
    record_requested(env, REQUESTED)
    transition(env, NORMALIZED, actor="extractor")
    record_admission_grant(env, REQUESTED, reason_code="SOMETHING", reason="text")
    assert env.grants[0].reason_code == ""
    assert env.grants[0].reason == ""


@pytest.mark.parametrize(
    ("reason_code", "reason"), [("", ""), ("ACCELERATOR_QUOTA", ""), ("", "at most 2 accelerators")]
)
def test_admission_grant_that_differs_without_reason_raises(reason_code: str, reason: str) -> None:
    env = _raw()
    record_requested(env, REQUESTED)
    transition(env, NORMALIZED, actor="extractor")
    before = _snapshot(env)
    with pytest.raises(
        ValueError, match=r"^a grant that is DECISION_OUTCOME_NARROWED needs a reason_code and a reason$"
    ):
        record_admission_grant(env, ADMISSION_GRANT, reason_code=reason_code, reason=reason)
    assert _snapshot(env) == before


def test_backend_grant_that_differs_without_reason_raises() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED))
    before = _snapshot(env)
    with pytest.raises(
        ValueError, match=r"^a grant that is DECISION_OUTCOME_ADJUSTED needs a reason_code and a reason$"
    ):
        record_grant(env, BACKEND_GRANT)
    assert _snapshot(env) == before
    assert env.lifecycle.state == ADMITTED


def test_record_grant_moves_to_granted() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED))
    outcome = record_grant(env, BACKEND_GRANT, reason_code="SUBSTITUTED", reason="H100", now_ns=T0 + 7 * MS)
    assert outcome == DO.DECISION_OUTCOME_ADJUSTED
    assert env.lifecycle.state == GRANTED
    step = env.lifecycle.transitions[-1]
    assert (getattr(step, "from"), step.to, step.actor, step.reason) == (
        ADMITTED,
        GRANTED,
        "backend",
        "SUBSTITUTED",
    )
    grant = env.grants[-1]
    assert grant.stage == GrantStage.GRANT_STAGE_BACKEND
    assert (grant.outcome, grant.reason_code, grant.reason) == (
        DO.DECISION_OUTCOME_ADJUSTED,
        "SUBSTITUTED",
        "H100",
    )
    assert grant.time.ToNanoseconds() == T0 + 7 * MS
    with pytest.raises(LifecycleError):
        record_grant(env, BACKEND_GRANT, reason_code="SUBSTITUTED", reason="H100")
    assert len(env.grants) == 2


@pytest.mark.parametrize(
    "states", [(NORMALIZED,), (NORMALIZED, ADMITTED, GRANTED, BOUND)], ids=["NORMALIZED", "BOUND"]
)
def test_record_grant_and_binding_refused_outside_their_states(states: tuple[int, ...]) -> None:
    env = _raw(*states)
    before = _snapshot(env)
    with pytest.raises(LifecycleError):
        record_grant(env, REQUESTED)
    with pytest.raises(LifecycleError):
        record_binding(env, BINDING)
    assert _snapshot(env) == before


@pytest.mark.parametrize(
    "states", [(NORMALIZED, ADMITTED), (NORMALIZED, ADMITTED, GRANTED)], ids=["ADMITTED", "GRANTED"]
)
def test_record_binding_moves_to_bound(states: tuple[int, ...]) -> None:
    env = _raw(*states)
    record_binding(env, BINDING, now_ns=T0 + 9 * MS)
    assert env.binding == BINDING
    assert env.lifecycle.state == BOUND
    step = env.lifecycle.transitions[-1]
    assert (getattr(step, "from"), step.to, step.actor) == (states[-1], BOUND, "backend")
    assert step.time.ToNanoseconds() == T0 + 9 * MS


def test_record_usage_merges_while_running() -> None:
    env = _raw(NORMALIZED)
    with pytest.raises(LifecycleError):
        record_usage(env, Usage(tokens=1))
    assert not env.HasField("outcome")
    transition(env, ADMITTED, actor="admission")
    record_usage(env, Usage(tokens=10, request_messages=1))
    transition(env, GRANTED, actor="backend")
    record_usage(env, Usage(tokens=25, response_messages=0))
    assert env.outcome.usage == Usage(tokens=25, request_messages=1, response_messages=0)
    assert env.outcome.usage.HasField("response_messages")
    assert not env.outcome.usage.HasField("duration_ms")


# -- reject ----------------------------------------------------------------------


def test_reject_from_normalized() -> None:
    env = _raw(NORMALIZED)
    reject(
        env, "REGION_NOT_ALLOWED", "not in us-west-2", status_code=7, actor="admission", now_ns=T0 + 5 * MS
    )
    assert env.lifecycle.state == REJECTED
    assert env.outcome.reason_code == "REGION_NOT_ALLOWED"
    assert env.outcome.status_code == 7
    assert env.outcome.status_message == "not in us-west-2"
    step = env.lifecycle.transitions[-1]
    assert (getattr(step, "from"), step.to, step.actor, step.reason) == (
        NORMALIZED,
        REJECTED,
        "admission",
        "REGION_NOT_ALLOWED",
    )
    assert env.lifecycle.end_time.ToNanoseconds() == T0 + 5 * MS


def test_reject_refuses_when_a_backend_grant_exists() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED))
    env.grants.add(stage=GrantStage.GRANT_STAGE_BACKEND, outcome=DO.DECISION_OUTCOME_ADMITTED)
    before = _snapshot(env)
    with pytest.raises(LifecycleError) as info:
        reject(env, "NO_CAPACITY", "full", status_code=8, actor="backend")
    assert str(info.value) == (
        "cannot reject an envelope that holds a backend grant: the envelope is LIFECYCLE_STATE_ADMITTED"
    )
    assert info.value.target == REJECTED
    assert _snapshot(env) == before


def test_reject_refuses_when_a_binding_exists() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED))
    env.binding.CopyFrom(BINDING)
    before = _snapshot(env)
    with pytest.raises(LifecycleError):
        reject(env, "NO_CAPACITY", "full", status_code=8, actor="backend")
    assert _snapshot(env) == before


def test_reject_refuses_after_record_grant() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED, GRANTED))
    before = _snapshot(env)
    with pytest.raises(LifecycleError) as info:
        reject(env, "NO_CAPACITY", "full", status_code=8, actor="backend")
    assert "backend grant" in str(info.value)
    assert _snapshot(env) == before


def test_reject_allows_an_admission_grant() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED))
    reject(env, "NO_CAPACITY", "full", status_code=8, actor="backend")
    assert env.lifecycle.state == REJECTED
    assert validate(env) == []


# -- compare ---------------------------------------------------------------------

QUANTITY_NAMES = sorted(QUANTITIES)


def _res(**values: Any) -> Resources:
    return Resources(**values)


COMPARE_CASES: list[tuple[str, Resources, Resources, int]] = [
    ("both-empty", Resources(), Resources(), DO.DECISION_OUTCOME_ADMITTED),
    ("equal", REQUESTED, Resources.FromString(REQUESTED.SerializeToString()), DO.DECISION_OUTCOME_ADMITTED),
    ("zero-equals-zero", _res(tokens=0), _res(tokens=0), DO.DECISION_OUTCOME_ADMITTED),
    ("same-type", _res(accelerator_type="a100"), _res(accelerator_type="a100"), DO.DECISION_OUTCOME_ADMITTED),
    (
        "type-substituted",
        _res(accelerator_count=2, accelerator_type="a100"),
        _res(accelerator_count=2, accelerator_type="h100"),
        DO.DECISION_OUTCOME_ADJUSTED,
    ),
    ("type-dropped", _res(accelerator_type="a100"), Resources(), DO.DECISION_OUTCOME_NARROWED),
    ("type-filled-in", Resources(), _res(accelerator_type="a100"), DO.DECISION_OUTCOME_WIDENED),
    (
        "narrowed-and-widened",
        _res(accelerator_count=4, cpu_millis=1000),
        _res(accelerator_count=2, cpu_millis=2000),
        DO.DECISION_OUTCOME_ADJUSTED,
    ),
    ("dropped-and-filled-in", _res(tokens=5), _res(bytes=5), DO.DECISION_OUTCOME_ADJUSTED),
    (
        "narrowed-two",
        _res(replicas_min=2, replicas_max=4),
        _res(replicas_min=1, replicas_max=2),
        DO.DECISION_OUTCOME_NARROWED,
    ),
]
for _n in QUANTITY_NAMES:
    COMPARE_CASES += [
        (f"{_n}-lower", _res(**{_n: 4}), _res(**{_n: 3}), DO.DECISION_OUTCOME_NARROWED),
        (f"{_n}-dropped", _res(**{_n: 4}), Resources(), DO.DECISION_OUTCOME_NARROWED),
        (f"{_n}-zero-then-unset", _res(**{_n: 0}), Resources(), DO.DECISION_OUTCOME_NARROWED),
        (f"{_n}-higher", _res(**{_n: 4}), _res(**{_n: 5}), DO.DECISION_OUTCOME_WIDENED),
        (f"{_n}-filled-in", Resources(), _res(**{_n: 4}), DO.DECISION_OUTCOME_WIDENED),
        (f"{_n}-unset-then-zero", Resources(), _res(**{_n: 0}), DO.DECISION_OUTCOME_WIDENED),
        (f"{_n}-equal", _res(**{_n: 4}), _res(**{_n: 4}), DO.DECISION_OUTCOME_ADMITTED),
    ]


@pytest.mark.parametrize(
    ("requested", "granted", "expected"),
    [c[1:] for c in COMPARE_CASES],
    ids=[c[0] for c in COMPARE_CASES],
)
def test_compare(requested: Resources, granted: Resources, expected: int) -> None:
    assert DO.Name(compare(requested, granted)) == DO.Name(expected)


@pytest.mark.parametrize(
    ("requested", "granted", "expected"),
    [c[1:] for c in COMPARE_CASES],
    ids=[c[0] for c in COMPARE_CASES],
)
def test_compare_agrees_with_the_contract(requested: Resources, granted: Resources, expected: int) -> None:
    """A grant carrying compare()'s outcome satisfies every grant rule of the proto. A grant that
    differs from the request breaks one with any other outcome except ADJUSTED, which the proto
    accepts for every difference; an equal grant may carry any outcome (with a reason)."""
    for outcome in (
        DO.DECISION_OUTCOME_ADMITTED,
        DO.DECISION_OUTCOME_NARROWED,
        DO.DECISION_OUTCOME_WIDENED,
        DO.DECISION_OUTCOME_ADJUSTED,
    ):
        env = _raw(NORMALIZED)
        env.requested.CopyFrom(requested)
        env.grants.add(stage=GrantStage.GRANT_STAGE_BACKEND, outcome=outcome, reason_code="WHY", reason="why")
        env.grants[0].resources.CopyFrom(granted)
        grant_rules = {v.rule_id for v in validate(env) if v.rule_id.startswith("grant.")}
        if outcome == expected:
            assert grant_rules == set(), DO.Name(outcome)
        elif expected != DO.DECISION_OUTCOME_ADMITTED and outcome != DO.DECISION_OUTCOME_ADJUSTED:
            # The proto accepts ADJUSTED for any difference, and any outcome for an equal grant.
            assert grant_rules, DO.Name(outcome)


def test_recorded_grant_uses_compare() -> None:
    env = _raw()
    record_requested(env, _res(accelerator_count=1, accelerator_type="nvidia-l4"))
    transition(env, NORMALIZED, actor="extractor")
    got = record_admission_grant(
        env,
        _res(accelerator_count=1, accelerator_type="nvidia-l4", accelerator_memory_bytes=0),
        reason_code="MEMORY_FILLED_IN",
        reason="zero is a value",
    )
    assert got == DO.DECISION_OUTCOME_WIDENED
    assert env.grants[0].outcome == DO.DECISION_OUTCOME_WIDENED
    env.decision.outcome = got
    assert validate(env) == []


# -- validate / replay -------------------------------------------------------------


def test_validate_reports_core_and_contract_rules_together() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED, GRANTED, BOUND))
    env.lifecycle.transitions[3].time.FromNanoseconds(T0)  # GRANTED before ADMITTED
    env.request_id = "has space"
    got = {(v.rule_id, v.field) for v in validate(env)}
    assert got == {("string.pattern", "request_id"), ("lifecycle.time_goes_back", "lifecycle.transitions[3]")}
    assert [v.rule_id for v in replay(env)] == ["lifecycle.time_goes_back"]
    assert all(v.message for v in validate(env))


def test_validate_reports_an_undefined_state_instead_of_raising() -> None:
    env = _raw(NORMALIZED)
    env.lifecycle.transitions[1].to = 42
    got = {(v.rule_id, v.field) for v in validate(env)}
    assert got == {
        ("enum.defined_only", "lifecycle.transitions[1].to"),
        ("lifecycle.state_matches_transitions", "lifecycle"),
        ("lifecycle.illegal_transition", "lifecycle.transitions[1]"),
    }


def test_first_transition_before_the_epoch_has_nothing_to_go_back_from() -> None:
    env = new_envelope(METHOD, request_id="req-1", envelope_id=ENVELOPE_ID, now_ns=-5 * MS)
    assert replay(env) == []


# -- proto3 JSON -----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=[_path_id(p) for p in PATHS])
def test_json_round_trip(path: tuple[int, ...]) -> None:
    env = _build(path)
    text = to_json(env)
    again = from_json(text)
    assert again == env
    assert _snapshot(again) == _snapshot(env)
    assert from_json(to_json(env, indent=2)) == env


def test_json_is_proto3_json() -> None:
    env = _build((RECEIVED, NORMALIZED, ADMITTED, GRANTED, BOUND, COMPLETED))
    data = json.loads(to_json(env))
    assert data["envelopeId"] == ENVELOPE_ID
    assert data["schemaVersion"] == "1.0"
    assert data["lifecycle"]["state"] == "LIFECYCLE_STATE_COMPLETED"
    assert data["lifecycle"]["transitions"][0] == {
        "to": "LIFECYCLE_STATE_RECEIVED",
        "time": "2025-06-02T09:14:03Z",
        "actor": "receiver",
    }
    assert data["lifecycle"]["transitions"][1]["from"] == "LIFECYCLE_STATE_RECEIVED"
    assert data["requested"] == {
        "acceleratorCount": "4",
        "acceleratorType": "nvidia-a100-80gb",
        "replicasMin": "0",
        "replicasStart": "1",
        "tokens": "0",
    }
    assert data["grants"][1]["outcome"] == "DECISION_OUTCOME_ADJUSTED"
    assert data["grants"][1]["stage"] == "GRANT_STAGE_BACKEND"


def test_json_keeps_explicit_zero_apart_from_unset() -> None:
    env = from_json('{"requested": {"tokens": "0"}}')
    assert env.requested.HasField("tokens")
    assert not env.requested.HasField("bytes")
    assert json.loads(to_json(env)) == {"requested": {"tokens": "0"}}


@pytest.mark.parametrize(
    "text",
    [
        '{"envelopeId": "' + ENVELOPE_ID + '", "colour": "blue"}',
        '{"requested": {"gpus": "4"}}',
        '{"lifecycle": {"transitions": [{"to": "LIFECYCLE_STATE_RECEIVED", "when": "2025-06-02T09:14Z"}]}}',
    ],
    ids=["top-level", "nested", "repeated"],
)
def test_from_json_rejects_unknown_fields(text: str) -> None:
    with pytest.raises(json_format.ParseError):
        from_json(text)


def test_from_json_rejects_unknown_enum_name() -> None:
    with pytest.raises(json_format.ParseError):
        from_json('{"lifecycle": {"state": "LIFECYCLE_STATE_DONE"}}')


def test_generated_module_is_the_one_the_model_uses() -> None:
    assert envelope_pb2.ExecutionEnvelope is ExecutionEnvelope
    assert type(_fresh()) is ExecutionEnvelope


def test_ids_differ_across_a_fork() -> None:
    import os

    from envelope_grpc._envelope import new_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert len(child) == 32
    assert child != new_id()
