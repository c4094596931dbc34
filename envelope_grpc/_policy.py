"""The admission seam: policies, their verdicts, and how verdicts compose.

A policy is a small callable that looks at an envelope (its requested
resources, principal, execution and scope) and returns Allow, Narrow or Deny.
Policies run in order: a Deny in enforce mode stops admission; Narrow caps
compose as the per-dimension minimum; dry-run verdicts are recorded only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from typing import Final, NamedTuple, Protocol, runtime_checkable

import grpc

from envelope_grpc._envelope import QUANTITIES, QUANTITY_FIELDS, compare, is_reason_code, stamp
from envelope_grpc._values import (
    BASIS_ERROR,
    BASIS_EXHAUSTED,
    BASIS_NOT_PERMITTED,
    FLAG_DRY_RUN_DENY,
    FLAG_FAIL_OPEN,
    MODE_DRY_RUN,
    MODE_ENFORCE,
    OUTCOME_ADMITTED,
    OUTCOME_DENIED,
    OUTCOME_NARROWED,
)
from envelope_grpc.v1.envelope_pb2 import (
    Decision,
    DecisionOutcome,
    DenialBasis,
    EnforcementMode,
    ExecutionEnvelope,
    ExecutionKind,
    ResourceDimension,
    Resources,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Allow:
    """Let the call through as asked."""

    message: str = ""
    rule_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Narrow:
    """Let the call through with less: every dimension set in ``caps`` is an
    upper bound on the grant (an accelerator type replaces the asked one)."""

    caps: Resources
    reason_code: str
    message: str
    rule_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the call with a gRPC status code and a reason."""

    code: grpc.StatusCode
    reason_code: str
    message: str
    basis: DenialBasis.ValueType = BASIS_NOT_PERMITTED
    rule_ids: tuple[str, ...] = ()


Verdict = Allow | Narrow | Deny


class Policy(Protocol):
    """An admission policy: reads the envelope, returns a verdict.

    The envelope holds the call's facts: its ids, principal, execution
    (method, kind, target, deadline, request digest), requested resources,
    scope, lineage and flags. The trace ids, lifecycle and decision are
    written after admission."""

    def __call__(self, envelope: ExecutionEnvelope, /) -> Verdict: ...


@runtime_checkable
class Releasing(Protocol):
    """A policy that takes something at admission (a quota) and gives it
    back when the call ends. ``release`` is called once for every call the
    policy was consulted on, whatever its verdict; it must be idempotent and
    must not block for long (it runs on the RPC path, after the handler)."""

    def release(self, envelope: ExecutionEnvelope, /) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy with its name and how it runs.

    ``dry_run`` records the verdict and changes nothing. ``fail_open`` decides
    what a raising or late policy means: None takes the interceptor's default
    (fail closed unless configured), True lets the call through and marks it.
    ``budget`` (seconds) bounds the policy's time, waiting for one of the
    shared policy workers included: it then runs on a worker thread, a late
    verdict counts as a failure, and a releasing policy that returns late
    from a call it refused is released once it does. ``blocking`` says the
    policy does I/O; with it, or a budget, grpc.aio servers admit calls off
    the event loop (and release them off it, for a releasing policy). A
    policy whose own ``blocking`` attribute is true is blocking whatever the
    spec says.
    """

    policy: Policy
    name: str = ""
    dry_run: bool = False
    fail_open: bool | None = None
    budget: float | None = None
    blocking: bool = False
    release: Releasing | None = dataclasses.field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.policy, Releasing):
            object.__setattr__(self, "release", self.policy)
        if getattr(self.policy, "blocking", False):
            object.__setattr__(self, "blocking", True)
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"a policy budget must be positive: {self.budget}")
        if not self.name:
            name = getattr(self.policy, "name", None) or getattr(self.policy, "__name__", None)
            object.__setattr__(self, "name", name or type(self.policy).__name__)

    def fails_open(self, default: bool) -> bool:
        """Whether a failure of this policy lets the call through (``default``:
        the interceptor's setting, unless the spec says)."""
        return default if self.fail_open is None else self.fail_open


def as_spec(policy: Policy | PolicySpec) -> PolicySpec:
    """A PolicySpec for a bare policy, or the spec itself."""
    return policy if isinstance(policy, PolicySpec) else PolicySpec(policy)


POLICY_ERROR = "POLICY_ERROR"
_log = logging.getLogger("envelope_grpc")


def _cap(granted: Resources, caps: Resources) -> None:
    for name in QUANTITIES:
        if caps.HasField(name) and (
            not granted.HasField(name) or getattr(granted, name) > getattr(caps, name)
        ):
            setattr(granted, name, getattr(caps, name))
    if caps.accelerator_type:
        granted.accelerator_type = caps.accelerator_type


_CREDENTIALS: Final = re.compile(r"(://)[^/@\s]+@")


def error_text(error: BaseException) -> str:
    """An exception as an audit record may keep it: its type and message,
    credentials in URLs masked, at most 256 characters."""
    text = _CREDENTIALS.sub(r"\1***@", f"{type(error).__name__}: {error}")
    return text if len(text) <= 256 else text[:255] + "…"


def _checked(verdict: object) -> Verdict:
    """``verdict`` if it is one the contract can record; a malformed verdict
    is the policy's failure, not a decision."""
    if not isinstance(verdict, Allow | Narrow | Deny):
        raise TypeError(f"a policy returned {type(verdict).__name__}, not Allow, Narrow or Deny")
    # Checked now, so that writing the decision into the envelope later cannot fail.
    for text in (verdict.message, *verdict.rule_ids):
        if text.__class__ is not str:
            raise TypeError(f"a verdict's message and rule ids are text, not {type(text).__name__}")
        text.encode()  # text that cannot be UTF-8 (a lone surrogate) cannot be recorded
    if isinstance(verdict, Allow):
        return verdict
    if not is_reason_code(verdict.reason_code) or not verdict.message:
        raise ValueError(f"a {type(verdict).__name__} needs a reason code like LIMIT_EXCEEDED and a message")
    if isinstance(verdict, Narrow) and verdict.caps.__class__ is not Resources:
        raise TypeError(f"a Narrow's caps are Resources, not {type(verdict.caps).__name__}")
    if isinstance(verdict, Deny) and verdict.code is grpc.StatusCode.OK:
        raise ValueError("a Deny cannot carry status OK")
    return verdict


# Budgeted policies wait on I/O: threads are cheap next to a call refused
# only because it queued for one (made as needed, up to this many).
_WORKERS = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="envelope-grpc-policy")


def _consult(spec: PolicySpec, env: ExecutionEnvelope, fail_open: bool) -> Verdict:
    if spec.budget is None:
        return spec.policy(env)
    future = _WORKERS.submit(spec.policy, env)
    try:
        return future.result(timeout=spec.budget)
    except concurrent.futures.TimeoutError:
        refuses = not spec.dry_run and not spec.fails_open(fail_open)
        if not future.cancel() and refuses and spec.release is not None:
            # It runs on after the call is refused and released: whatever it
            # takes is given back when it returns. (A call that goes on is
            # released when it ends.)
            release = spec.release
            future.add_done_callback(lambda _: _release_late(release, env))
        raise TimeoutError(f"no verdict within its budget of {spec.budget * 1000:g} ms") from None


def _release_late(policy: Releasing, env: ExecutionEnvelope) -> None:
    try:
        policy.release(env)
    except Exception:  # giving back must never fail; it is logged
        _log.exception("policy %r failed to release envelope %s", policy, env.envelope_id)


class PolicyRun(NamedTuple):
    """What one policy said, as the decision records it."""

    policy: str
    mode: EnforcementMode.ValueType
    outcome: DecisionOutcome.ValueType
    reason_code: str
    message: str
    rule_ids: tuple[str, ...]
    duration_us: int
    error: str = ""
    fail_open: bool = False


@dataclasses.dataclass(slots=True)
class Admission:
    """The result of admission: the grant (the request message itself when
    no policy capped it), the enforced denial if any, the policies that must
    be released when the call ends, and the decision, kept plain until
    ``write`` puts it into an envelope's Decision."""

    granted: Resources
    denied: Deny | None
    release: list[Releasing]
    runs: list[PolicyRun]
    mode: EnforcementMode.ValueType
    outcome: DecisionOutcome.ValueType
    deciding: tuple[str, Narrow | Deny] | None
    fail_open: bool
    time_ns: int

    @property
    def deciding_policy(self) -> str:
        """The policy whose verdict decided, or empty."""
        return self.deciding[0] if self.deciding is not None else ""

    @property
    def reason_code(self) -> str:
        """The deciding verdict's reason code, or empty."""
        return self.deciding[1].reason_code if self.deciding is not None else ""

    @property
    def message(self) -> str:
        """The deciding verdict's message, or empty."""
        return self.deciding[1].message if self.deciding is not None else ""

    def write(self, decision: Decision) -> None:
        """Record this admission as ``decision``."""
        for run in self.runs:
            record = decision.policies.add(
                policy=run.policy,
                mode=run.mode,
                outcome=run.outcome,
                message=run.message,
                duration_us=run.duration_us,
            )
            if run.reason_code:
                record.reason_code = run.reason_code
            if run.rule_ids:
                record.rule_ids.extend(run.rule_ids)
            if run.error:
                record.error = run.error
            if run.fail_open:
                record.fail_open = True
        decision.mode = self.mode
        if self.fail_open:
            decision.fail_open = True
        if self.denied is not None:
            record_denial(decision, self.deciding_policy, self.denied, self.time_ns)
            return
        decision.outcome = self.outcome
        if self.deciding is not None:
            decision.deciding_policy = self.deciding_policy
            decision.reason_code = self.reason_code
            decision.message = self.message
        stamp(decision.time, self.time_ns)


def admit(env: ExecutionEnvelope, policies: Sequence[PolicySpec], *, fail_open: bool) -> Admission:
    """Run ``policies`` over ``env``: the decision, not yet written anywhere.

    A failing or late policy that fails closed becomes an UNAVAILABLE /
    POLICY_ERROR denial. Flags (a dry-run denial, a fail-open) go into
    ``env`` at once.
    """
    requested = env.requested
    granted = requested  # copied before the first cap
    denied: Deny | None = None
    deciding: tuple[str, Narrow | Deny] | None = None
    release: list[Releasing] = []
    runs: list[PolicyRun] = []
    opened = False
    for spec in policies:
        started = time.perf_counter_ns()
        if spec.release is not None:
            release.append(spec.release)
        error = ""
        failed_open = False
        try:
            verdict: Verdict = _checked(_consult(spec, env, fail_open))
        except Exception as failure:  # a policy's failure must not escape admission
            error = error_text(failure)
            if spec.fails_open(fail_open):
                failed_open = True
                verdict = Allow()
                opened = opened or not spec.dry_run
            else:
                verdict = Deny(
                    grpc.StatusCode.UNAVAILABLE,
                    POLICY_ERROR,
                    f"policy {spec.name} failed; the call is refused (fail closed)",
                    BASIS_ERROR,
                )
        if isinstance(verdict, Allow):
            outcome, reason_code = OUTCOME_ADMITTED, ""
        else:
            outcome = OUTCOME_DENIED if isinstance(verdict, Deny) else OUTCOME_NARROWED
            reason_code = verdict.reason_code
        runs.append(
            PolicyRun(
                spec.name,
                MODE_DRY_RUN if spec.dry_run else MODE_ENFORCE,
                outcome,
                reason_code,
                verdict.message,
                verdict.rule_ids,
                (time.perf_counter_ns() - started) // 1000,
                error,
                failed_open,
            )
        )
        if spec.dry_run:
            if isinstance(verdict, Deny) and FLAG_DRY_RUN_DENY not in env.flags:
                env.flags.append(FLAG_DRY_RUN_DENY)
            continue
        if isinstance(verdict, Narrow):
            if granted is requested:
                granted = Resources()
                granted.CopyFrom(requested)
            _cap(granted, verdict.caps)
            deciding = deciding or (spec.name, verdict)
        elif isinstance(verdict, Deny):
            denied = verdict
            deciding = (spec.name, verdict)
            break
    if opened and FLAG_FAIL_OPEN not in env.flags:
        env.flags.append(FLAG_FAIL_OPEN)
    mode = MODE_DRY_RUN if policies and all(spec.dry_run for spec in policies) else MODE_ENFORCE
    if denied is not None:
        outcome = OUTCOME_DENIED
    else:
        outcome = OUTCOME_ADMITTED if granted is requested else compare(requested, granted)
    return Admission(granted, denied, release, runs, mode, outcome, deciding, opened, time.time_ns())


def record_denial(decision: Decision, policy: str, deny: Deny, now_ns: int | None = None) -> None:
    """Write ``deny``, by ``policy``, as the admission decision."""
    decision.outcome = OUTCOME_DENIED
    decision.deciding_policy = policy
    decision.reason_code = deny.reason_code
    decision.message = deny.message
    decision.denial_basis = deny.basis
    stamp(decision.time, time.time_ns() if now_ns is None else now_ns)


# -- the built-in limits policy ------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """A cap on one resource dimension, for one execution kind (or any: 0)
    and one tenant (or any: empty)."""

    dimension: ResourceDimension.ValueType
    maximum: int
    kind: ExecutionKind.ValueType = ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    tenant: str = ""
    deny: bool = False


class LimitsPolicy:
    """Static limits per execution kind, tenant and resource dimension.

    A request above a limit is narrowed to it, or denied with
    RESOURCE_EXHAUSTED / LIMIT_EXCEEDED when the limit says ``deny``.
    """

    def __init__(self, limits: Sequence[Limit], *, name: str = "limits") -> None:
        self.name = name
        for limit in limits:
            if limit.dimension not in QUANTITY_FIELDS:
                raise ValueError(f"not a quantity dimension: {limit.dimension}")
            if limit.maximum < 0:
                raise ValueError(f"a limit must not be negative: {limit}")
        self._limits = tuple(limits)

    def __call__(self, envelope: ExecutionEnvelope, /) -> Verdict:
        kind = envelope.execution.kind
        tenant = envelope.principal.tenant
        requested = envelope.requested
        caps = Resources()
        notes: list[str] = []
        for limit in self._limits:
            if (limit.kind and limit.kind != kind) or (limit.tenant and limit.tenant != tenant):
                continue
            field = QUANTITY_FIELDS[limit.dimension]
            if not requested.HasField(field) or getattr(requested, field) <= limit.maximum:
                continue
            asked = getattr(requested, field)
            what = f"{field} {asked} exceeds the limit of {limit.maximum} for {ExecutionKind.Name(kind)}"
            if limit.deny:
                return Deny(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "LIMIT_EXCEEDED",
                    what,
                    BASIS_EXHAUSTED,
                )
            if not caps.HasField(field) or getattr(caps, field) > limit.maximum:
                setattr(caps, field, limit.maximum)
            notes.append(what)
        if notes:
            return Narrow(caps, "LIMIT_NARROWED", "; ".join(notes))
        return Allow()
