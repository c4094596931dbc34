"""Envelopes made by hand, with fixed times, for the ledger and CLI tests."""

from __future__ import annotations

import os

from envelope_grpc import _envelope as model
from envelope_grpc import validate
from envelope_grpc.v1.envelope_pb2 import DecisionOutcome, ExecutionEnvelope, ExecutionKind, Resources

T0 = 1_800_000_000 * 1_000_000_000  # 2027-01-15, in ns: fixed start times for the time filters
INFERENCE = ExecutionKind.EXECUTION_KIND_INFERENCE
DEPLOYMENT = ExecutionKind.EXECUTION_KIND_DEPLOYMENT
RUN = "/t.v1.Models/Run"
DEPLOY = "/t.v1.Models/Deploy"


def admitted(
    requested: Resources | None = None,
    granted: Resources | None = None,
    *,
    tenant: str = "acme",
    subject: str = "alice",
    kind: int = INFERENCE,
    method: str = RUN,
    at: float = 0.0,
    parent: ExecutionEnvelope | None = None,
    trace_id: str = "",
    envelope_id: str = "",
) -> ExecutionEnvelope:
    """An envelope admitted ``at`` seconds after T0; narrowed when ``granted``
    is below ``requested``."""
    now = T0 + int(at * 1e9)
    env = model.new_envelope(method, now_ns=now, envelope_id=envelope_id, request_id="r-1")
    env.principal.tenant = tenant
    env.principal.subject = subject
    env.execution.kind = kind  # type: ignore[assignment]
    env.execution.target.name = "model-a"
    env.trace_id = trace_id or (parent.trace_id if parent is not None else os.urandom(16).hex())
    if parent is not None:
        env.lineage.parent_envelope_id = parent.envelope_id
        env.lineage.root_envelope_id = parent.lineage.root_envelope_id or parent.envelope_id
        env.lineage.depth = parent.lineage.depth + 1
    requested = requested or Resources(tokens=10)
    model.record_requested(env, requested)
    model.transition(env, model.NORMALIZED, actor="extractor", now_ns=now + 1_000)
    granted = requested if granted is None else granted
    outcome = model.compare(requested, granted)
    decision = env.decision
    decision.outcome = outcome  # type: ignore[assignment]
    decision.policies.add(policy="limits", outcome=outcome)
    if outcome != DecisionOutcome.DECISION_OUTCOME_ADMITTED:
        decision.deciding_policy = "limits"
        decision.reason_code = "LIMIT_NARROWED"
        decision.message = "capped"
    model.record_admission_grant(
        env, granted, reason_code=decision.reason_code, reason=decision.message, now_ns=now + 2_000
    )
    model.transition(env, model.ADMITTED, actor="admission", now_ns=now + 3_000)
    assert validate(env) == []
    return env


def finished(
    env: ExecutionEnvelope, state: int = model.COMPLETED, *, backend: Resources | None = None
) -> ExecutionEnvelope:
    """A copy of ``env`` carried to ``state``, with the backend's grant when given."""
    done = ExecutionEnvelope()
    done.CopyFrom(env)
    now = env.lifecycle.transitions[-1].time.ToNanoseconds() + 1_000_000
    if backend is not None:
        model.record_grant(
            done, backend, reason_code="BACKEND_SIZED", reason="sized by the backend", now_ns=now
        )
    if state == model.REJECTED:
        model.reject(done, "NO_CAPACITY", "no capacity", status_code=9, actor="backend", now_ns=now + 1)
    else:
        model.transition(done, state, actor="completion", now_ns=now + 1)  # type: ignore[arg-type]
    assert validate(done) == []
    return done


def denied(requested: Resources, *, tenant: str, subject: str, at: float = 0.0, method: str = RUN,
           kind: int = INFERENCE) -> ExecutionEnvelope:  # fmt: skip
    """An envelope denied at admission (LIMIT_EXCEEDED)."""
    now = T0 + int(at * 1e9)
    env = model.new_envelope(method, now_ns=now)
    env.principal.tenant = tenant
    env.principal.subject = subject
    env.execution.kind = kind  # type: ignore[assignment]
    env.trace_id = os.urandom(16).hex()
    model.record_requested(env, requested)
    model.transition(env, model.NORMALIZED, actor="extractor", now_ns=now + 1_000)
    decision = env.decision
    decision.outcome = DecisionOutcome.DECISION_OUTCOME_DENIED
    decision.deciding_policy = "limits"
    decision.reason_code = "LIMIT_EXCEEDED"
    decision.message = "too many accelerators"
    model.reject(
        env, "LIMIT_EXCEEDED", "too many accelerators", status_code=8, actor="admission", now_ns=now + 2_000
    )
    assert validate(env) == []
    return env


def sample() -> list[ExecutionEnvelope]:
    """Six envelopes, ten seconds apart: every filter and every stat has
    something to tell apart."""
    shared_trace = os.urandom(16).hex()
    e1 = finished(admitted(Resources(tokens=100, bytes=10), at=0, trace_id=shared_trace))
    e2 = finished(admitted(Resources(tokens=5000), Resources(tokens=4096), at=10, trace_id=shared_trace))
    e3 = finished(
        admitted(Resources(accelerator_count=2), subject="bob", kind=DEPLOYMENT, method=DEPLOY, at=20),
        backend=Resources(accelerator_count=2, memory_bytes=8 << 30),
    )
    e4 = denied(
        Resources(accelerator_count=32), tenant="globex", subject="bob", at=30, method=DEPLOY, kind=DEPLOYMENT
    )
    e5 = finished(admitted(Resources(tokens=10), tenant="globex", subject="bob", at=40), model.REJECTED)
    e6 = admitted(Resources(tokens=20), tenant="globex", subject="carol", at=50)  # still running
    return [e1, e2, e3, e4, e5, e6]


def ids(envelopes: list[ExecutionEnvelope]) -> list[str]:
    return [env.envelope_id for env in envelopes]
