"""The core: everything an interceptor decides, with no I/O.

The ``grpc`` and ``grpc.aio`` shells fetch inputs from the servicer context,
call ``begin`` before the handler and ``end`` after it, and do the awaiting
and aborting. Both contexts offer the same synchronous accessors
(invocation_metadata, peer, auth_context, time_remaining, code, details,
trailing_metadata, set_trailing_metadata), so the core reads them directly.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import grpc
import protovalidate
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import metrics, trace

from envelope_grpc import _constants as k
from envelope_grpc import _envelope as model
from envelope_grpc._extract import Action, Extraction, ExtractorRegistry, MethodPlan
from envelope_grpc._policy import (
    POLICY_ERROR,
    Admission,
    Deny,
    Policy,
    PolicySpec,
    Releasing,
    admit,
    as_spec,
    record_denial,
)
from envelope_grpc._sinks import Sink, SinkDispatcher, SinkStats, WriteAheadSink
from envelope_grpc._telemetry import KIND_NAMES, OUTCOME_NAMES, Metrics, Progress, annotate, progress
from envelope_grpc._types import CallInfo, Peer, Resolver, TrustPeer, Unauthenticated
from envelope_grpc._values import (
    AUTH_NONE,
    BASIS_ERROR,
    BASIS_INVALID,
    FLAG_EXTRACTION_FAILED,
    FLAG_PEER_ENVELOPE_MALFORMED,
    FLAG_PEER_ENVELOPE_OVERSIZED,
    FLAG_PEER_ENVELOPE_UNTRUSTED,
    OUTCOME_ADMITTED,
    OUTCOME_DENIED,
    OUTCOME_UNSPECIFIED,
    PRINCIPAL_ANONYMOUS,
    STAGE_ADMISSION,
)
from envelope_grpc.v1.envelope_pb2 import (
    EnvelopeContext,
    ExecutionEnvelope,
    LifecycleState,
    Principal,
    Resources,
)

#: The call being handled, for the handler API and the client interceptors.
CURRENT: Final[contextvars.ContextVar[Call | None]] = contextvars.ContextVar(
    "execution_envelope", default=None
)

_log = logging.getLogger("envelope_grpc")
_NO_DEADLINE: Final = 1e8  # seconds; grpc reports "no deadline" as a huge remainder
_Pairs = Sequence[tuple[str, str | bytes]]


@dataclasses.dataclass(frozen=True)
class EnvelopeConfig:
    """How interceptors build, admit and report envelopes.

    ``policies`` run in order (wrap one in PolicySpec for dry-run or
    fail-open). ``resolvers`` are tried in order; the first principal wins and
    the caller is anonymous when none answers. A peer's envelope becomes
    lineage only when ``trust_peer`` says so; by default no peer is trusted.
    The first request message is digested (SHA-256) when it is at most
    ``digest_max_bytes`` long; 0 turns digests off.
    """

    extractors: ExtractorRegistry = dataclasses.field(default_factory=ExtractorRegistry)
    policies: Sequence[Policy | PolicySpec] = ()
    resolvers: Sequence[Resolver] = ()
    sinks: Sequence[Sink] = ()
    trust_peer: TrustPeer | None = None
    fail_open: bool = False
    digest_max_bytes: int = 1 << 20
    meter_provider: metrics.MeterProvider | None = None
    max_sink_queue: int = 10_000


class _End(NamedTuple):
    """How a call ended: its terminal state, the step's reason, status and
    details, when, and its message counts and sizes at that moment."""

    state: LifecycleState.ValueType
    reason: str
    code: grpc.StatusCode
    details: str
    ns: int
    usage: tuple[tuple[str, int], ...]
    streamed: bool


class Call:
    """One call: its envelope's facts, and what became of it, kept plain.

    The facts (ids, principal, execution, requested, scope, lineage, flags,
    request digest) are written into ``env`` as they are found; policies
    read them there. The trace and span ids, the lifecycle, the decision,
    the admission grant and the outcome are kept as plain values until
    someone needs the whole envelope (``envelope()``: the handler API, a
    write-ahead sink, a releasing policy, or the sinks on their own thread);
    from then on every step is written into the envelope at once. A call
    that nobody reads in full never builds its envelope at all: its span is
    told from the plain values.
    """

    __slots__ = (
        "_lock",
        "admission",
        "ended",
        "env",
        "finish",
        "materialized",
        "release",
        "request_bytes",
        "request_messages",
        "response_bytes",
        "response_messages",
        "span",
        "started_ns",
        "steps",
    )

    def __init__(self, env: ExecutionEnvelope, span: trace.Span, started_ns: int) -> None:
        self.env = env
        self.span = span
        self.started_ns = started_ns
        self.request_messages = self.request_bytes = 0
        self.response_messages = self.response_bytes = 0
        self.ended = False
        self.release: Sequence[Releasing] = ()
        #: Admission's steps (state, actor, reason, ns) not yet in ``env``.
        self.steps: list[tuple[LifecycleState.ValueType, str, str, int]] = [
            (model.RECEIVED, k.ACTOR_RECEIVER, "", started_ns)
        ]
        self.admission: Admission | None = None
        #: How the call ended, once it has.
        self.finish: _End | None = None
        #: Whether ``env`` holds everything; set once it does.
        self.materialized = False
        # Building the envelope and ending the call may happen on two threads
        # (a handler thread or the sinks' thread, and the call's own).
        self._lock = threading.Lock()

    def count_request(self, message: Message) -> None:
        """Count one request message."""
        self.request_messages += 1
        self.request_bytes += message.ByteSize()

    def count_response(self, message: Any) -> None:
        """Count one response message."""
        self.response_messages += 1
        if isinstance(message, Message):
            self.response_bytes += message.ByteSize()

    def step(self, to: LifecycleState.ValueType, actor: str, reason: str = "") -> None:
        """Take an admission step (legal by construction)."""
        if self.materialized:
            model.transition(self.env, to, actor=actor, reason=reason)
        else:
            self.steps.append((to, actor, reason, time.time_ns()))

    def envelope(self) -> ExecutionEnvelope:
        """The whole envelope so far; the plain values are written into it
        the first time, and every later step goes straight into it."""
        if self.materialized:
            return self.env
        with self._lock:
            if not self.materialized:
                self._build()
                self.materialized = True
        return self.env

    def _build(self) -> None:
        """Write the plain values into the envelope: all of them, or (when
        one cannot be written) none."""
        env = self.env
        try:
            span_context = self.span.get_span_context()
            if span_context.is_valid:
                env.trace_id = format(span_context.trace_id, "032x")
                env.span_id = format(span_context.span_id, "016x")
            lifecycle = env.lifecycle
            model.stamp(lifecycle.start_time, self.started_ns)
            state = model.UNSPECIFIED
            for to, actor, reason, ns in self.steps:
                model.write_step(lifecycle, state, to, actor, reason, ns)
                state = to
            admission = self.admission
            if admission is not None:
                admission.write(env.decision)
                if admission.denied is None:
                    model.write_grant(
                        env,
                        STAGE_ADMISSION,
                        admission.granted,
                        reason_code=admission.reason_code,
                        reason=admission.message,
                        actor=k.ACTOR_ADMISSION,
                        now_ns=admission.time_ns,
                    )
            if self.finish is not None:
                self._write_end(self.finish)
        except Exception:
            for name in ("trace_id", "span_id", "lifecycle", "decision", "grants", "outcome"):
                env.ClearField(name)
            raise

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with ``code``; an envelope already built records it at once."""
        ns = time.time_ns()
        usage = (
            ("request_messages", self.request_messages),
            ("response_messages", self.response_messages),
            ("request_bytes", self.request_bytes),
            ("response_bytes", self.response_bytes),
            ("duration_ms", (ns - self.started_ns) // 1_000_000),
        )
        streamed = self.request_messages > 1 or self.response_messages > 1
        state = _END_STATES.get(code, model.FAILED)
        reason = "" if code is grpc.StatusCode.OK else code.name
        finish = _End(state, reason, code, details[:1024], ns, usage, streamed)
        with self._lock:
            self.finish = finish
            if self.materialized:  # the handler holds the envelope: it sees the end
                self._write_end(finish)

    def _write_end(self, finish: _End) -> None:
        env = self.env
        outcome = env.outcome
        usage = outcome.usage
        for name, value in finish.usage:
            setattr(usage, name, value)
        outcome.status_code = finish.code.value[0]
        if finish.details:
            outcome.status_message = finish.details
        model.transition(env, finish.state, actor=k.ACTOR_COMPLETION, reason=finish.reason, now_ns=finish.ns)

    def progress(self) -> Progress:
        """What became of the call, for its span."""
        if self.materialized:
            return progress(self.env)
        admission = self.admission
        finish = self.finish
        if admission is None or finish is None:
            raise RuntimeError("a call that is neither refused nor ended has no progress to tell")
        return Progress(
            state=finish.state,
            outcome=admission.outcome,
            policy=admission.deciding_policy,
            reason=admission.reason_code,
            mode=admission.mode if admission.runs else None,
            fail_open=admission.fail_open,
            granted=admission.granted if admission.outcome != OUTCOME_ADMITTED else None,
            usage=finish.usage,
            streamed=finish.streamed,
            binding=None,
            steps=(*self.steps, (finish.state, k.ACTOR_COMPLETION, finish.reason, finish.ns)),
            start_ns=self.started_ns,
            error="",
        )


_END_STATES: Final = {
    grpc.StatusCode.OK: model.COMPLETED,
    grpc.StatusCode.CANCELLED: model.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED: model.CANCELLED,
}


@dataclasses.dataclass(frozen=True)
class AbortStatus(grpc.Status):
    """The status a refused call is aborted with."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _first_values(pairs: _Pairs | None) -> tuple[dict[str, str | bytes], frozenset[str]]:
    """The first value of each metadata key, and the keys sent more than once."""
    found: dict[str, str | bytes] = {}
    again: set[str] = set()
    for key, value in pairs or ():
        if key in found:
            again.add(key)
        else:
            found[key] = value
    return found, frozenset(again)


def _request_id(value: str | bytes | None) -> str:
    if (
        isinstance(value, str)
        and 0 < len(value) <= 128
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ):
        return value
    return ""


class Core:
    """The decisions of the envelope interceptors, shared by grpc and grpc.aio."""

    def __init__(self, config: EnvelopeConfig) -> None:
        self.config = config
        self.extractors = config.extractors
        self.policies = tuple(as_spec(policy) for policy in config.policies)
        #: Sinks that record envelopes at admission too.
        self.write_ahead = tuple(sink for sink in config.sinks if isinstance(sink, WriteAheadSink))
        #: Whether admission may block (I/O or budgeted policies, write-ahead
        #: sinks): grpc.aio servers then admit off the event loop.
        self.blocking = bool(self.write_ahead) or any(
            spec.blocking or spec.budget is not None for spec in self.policies
        )
        #: Whether ending a call may block (releasing a policy that does I/O).
        self.blocking_end = any(spec.blocking and spec.release is not None for spec in self.policies)
        self._resolvers = tuple(config.resolvers)
        #: Whether the peer's auth context is read (resolvers or a trust predicate use it).
        self._reads_auth = bool(self._resolvers) or config.trust_peer is not None
        self.metrics = Metrics(config.meter_provider)
        self.dispatcher = (
            SinkDispatcher(config.sinks, max_queue=config.max_sink_queue) if config.sinks else None
        )

    def plan(self, method: str) -> MethodPlan:
        """How calls of ``method`` are handled."""
        return self.extractors.plan(method)

    # -- before the handler ---------------------------------------------------------

    def begin(
        self, plan: MethodPlan, context: Any, request: Message | None
    ) -> tuple[Call, AbortStatus | None]:
        """Receive, normalize and admit a call; ``request`` is the first request
        message (None for a request stream that ended at once). Returns the
        call and, when it is refused, the status to abort with."""
        call, refused = self._receive(plan, context)
        # Encoded once: for its size and its digest (ByteSize() encodes it too).
        encoded = request.SerializeToString() if request is not None else b""
        if request is not None:
            call.request_messages, call.request_bytes = 1, len(encoded)
        try:
            status = self._admit(call, plan, request, encoded, refused)
        except Exception as error:  # admission must end in a decision, never an escaping error
            _log.exception("admission of envelope %s failed", call.env.envelope_id)
            status = self._fail_admission(call, error)
        if status is None:
            # Set now: a grpc.aio handler's abort() sends the trailers at once.
            context.set_trailing_metadata(call_trailers(call))
        return call, status

    def _receive(self, plan: MethodPlan, context: Any) -> tuple[Call, tuple[str, Deny] | None]:
        """The call's envelope from what the transport says, and the
        identity's refusal if any."""
        now = time.time_ns()
        metadata, repeated = _first_values(context.invocation_metadata())
        env = model.blank_envelope(plan.method, request_id=_request_id(metadata.get(k.REQUEST_ID_METADATA)))
        span = trace.get_current_span()
        remaining = context.time_remaining()
        if remaining is not None and remaining < _NO_DEADLINE:
            model.stamp(env.execution.deadline, now + int(remaining * 1e9))
        call = Call(env, span, now)
        address = context.peer() or ""
        principal = env.principal
        principal.source_address = address[:256]
        agent = metadata.get("user-agent")
        if isinstance(agent, str):
            principal.user_agent = agent[:512]
        inbound = metadata.get(k.ENVELOPE_METADATA)
        refused = None
        if self._resolvers or inbound is not None:
            peer = Peer(address, (context.auth_context() or {}) if self._reads_auth else {})
            if self._resolvers:
                info = CallInfo(plan.method, metadata, peer, repeated=repeated)
                refused = self._resolve(principal, info)
                for flag in info.flags:
                    if flag not in env.flags:
                        env.flags.append(flag)
            if inbound is not None:
                self._lineage(env, inbound, peer)
        if not principal.kind:
            principal.kind = PRINCIPAL_ANONYMOUS
        if not principal.auth_method:
            principal.auth_method = AUTH_NONE
        return call, refused

    def _resolve(self, principal: Principal, info: CallInfo) -> tuple[str, Deny] | None:
        """Ask the resolvers in order; the first principal wins. A refusal or
        a failing resolver is an UNAUTHENTICATED denial."""
        for resolver in self._resolvers:
            try:
                found = resolver(info)
                if found is not None and found.__class__ is not Principal:
                    raise TypeError(f"a resolver returned {type(found).__name__}, not a Principal")
            except Unauthenticated as refused:
                return "identity", Deny(
                    grpc.StatusCode.UNAUTHENTICATED, refused.reason_code, refused.message, BASIS_INVALID
                )
            except Exception as error:  # an identity source that fails must not admit anyone
                return "identity", Deny(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "IDENTITY_ERROR",
                    f"identity could not be resolved ({type(error).__name__})",
                    BASIS_ERROR,
                )
            if found is not None:
                principal.MergeFrom(found)
                return None
        return None

    def _lineage(self, env: ExecutionEnvelope, inbound: str | bytes, peer: Peer) -> None:
        flag = None
        if not isinstance(inbound, bytes):
            flag = FLAG_PEER_ENVELOPE_MALFORMED
        elif len(inbound) > k.MAX_PEER_ENVELOPE_BYTES:
            flag = FLAG_PEER_ENVELOPE_OVERSIZED
        elif not self._trusted(peer):
            flag = FLAG_PEER_ENVELOPE_UNTRUSTED
        else:
            parent = EnvelopeContext()
            try:
                parent.ParseFromString(inbound)
                valid = not protovalidate.collect_violations(parent) and parent.envelope_id != env.envelope_id
            except DecodeError:
                valid = False
            if valid:
                env.lineage.parent_envelope_id = parent.envelope_id
                env.lineage.root_envelope_id = parent.root_envelope_id or parent.envelope_id
                env.lineage.depth = parent.depth + 1
                return
            flag = FLAG_PEER_ENVELOPE_MALFORMED
        env.flags.append(flag)

    def _trusted(self, peer: Peer) -> bool:
        if self.config.trust_peer is None:
            return False
        try:
            return bool(self.config.trust_peer(peer))
        except Exception:  # a failing predicate trusts nobody
            _log.exception("trust_peer failed for %s", peer.address)
            return False

    def _normalize(
        self, call: Call, plan: MethodPlan, request: Message | None, encoded: bytes
    ) -> tuple[str, Deny] | None:
        """Map the request (``encoded``: its bytes) into the envelope. A request
        that cannot be mapped (a value out of range, a failing extractor) is
        refused: admitting it on transport facts alone would let it pass
        every limit unseen."""
        env = call.env
        execution = env.execution
        execution.kind = plan.kind
        try:
            found: Extraction | None = None
            if request is not None and plan.fill is not None:
                # Declarative extraction writes straight into the envelope's messages.
                found = Extraction(plan.kind, execution.target, env.requested, env.scope)
                plan.fill(request, found)
            elif request is not None and plan.extractor is not None:
                found = plan.extractor(request)
                if found.kind not in KIND_NAMES:
                    raise ValueError(f"unknown execution kind {found.kind}")
                execution.kind = found.kind or plan.kind
                execution.target.CopyFrom(found.target)
                env.scope.CopyFrom(found.scope)
                env.requested.CopyFrom(found.requested)
            if found is not None and (found.tenant or found.project):
                _declared(env, found)
        except Exception as failure:
            env.flags.append(FLAG_EXTRACTION_FAILED)
            for holder, name in ((execution, "target"), (env, "requested"), (env, "scope")):
                holder.ClearField(name)  # type: ignore[arg-type]
            execution.kind = plan.kind
            call.step(model.NORMALIZED, k.ACTOR_EXTRACTOR, "EXTRACTION_FAILED")
            message = f"the request could not be mapped into an envelope ({type(failure).__name__})"
            return "extractor", Deny(
                grpc.StatusCode.INVALID_ARGUMENT, "EXTRACTION_FAILED", message, BASIS_INVALID
            )
        if 0 < len(encoded) <= self.config.digest_max_bytes:
            execution.request_digest = "sha256:" + hashlib.sha256(encoded).hexdigest()
        call.step(model.NORMALIZED, k.ACTOR_EXTRACTOR)
        return None

    def _admit(
        self,
        call: Call,
        plan: MethodPlan,
        request: Message | None,
        encoded: bytes,
        refused: tuple[str, Deny] | None,
    ) -> AbortStatus | None:
        """Normalize, then refuse (``refused`` by identity, an unmappable
        request, negative amounts, an unmapped method) or run the policies."""
        env = call.env
        unmapped = self._normalize(call, plan, request, encoded)
        refused = refused or unmapped
        if refused is None and env.HasField("requested"):
            refused = _negative(env)
        if refused is None and plan.action is Action.DENY:
            refused = (
                "extractor",
                Deny(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "METHOD_NOT_MAPPED",
                    f"{plan.method} is not mapped to an execution kind",
                ),
            )
        if refused is not None:
            return self._deny(call, *refused)
        admission = admit(env, self.policies, fail_open=self.config.fail_open)
        call.release = admission.release
        call.admission = admission
        if admission.denied is not None:
            return self._refuse(call, admission.deciding_policy, admission.denied)
        call.step(model.ADMITTED, k.ACTOR_ADMISSION, admission.reason_code)
        self._count(env, admission.outcome, admission.granted)
        for sink in self.write_ahead:
            try:
                sink.admitted(call.envelope())
            except Exception:  # counted like any sink loss; the call goes on
                if self.dispatcher is not None:
                    self.dispatcher.count_failure(1)
                _log.exception("write-ahead sink %r lost envelope %s", sink, env.envelope_id)
        return None

    def _deny(self, call: Call, policy: str, deny: Deny) -> AbortStatus:
        """Refuse before the policies ran (identity, extraction, unmapped)."""
        record_denial(call.envelope().decision, policy, deny)
        return self._refuse(call, policy, deny)

    def _fail_admission(self, call: Call, error: Exception) -> AbortStatus:
        """An unexpected error during admission, before the call was admitted
        or rejected (every later step handles its own errors): refuse the
        call (fail closed), recording why."""
        env = call.envelope()
        if env.lifecycle.state == model.RECEIVED:
            model.transition(env, model.NORMALIZED, actor=k.ACTOR_EXTRACTOR)
        env.ClearField("decision")
        deny = Deny(
            grpc.StatusCode.UNAVAILABLE,
            POLICY_ERROR,
            f"admission failed ({type(error).__name__}); the call is refused",
            BASIS_ERROR,
        )
        return self._deny(call, "admission", deny)

    def _refuse(self, call: Call, policy: str, deny: Deny) -> AbortStatus:
        env = call.envelope()
        # Built first: once the envelope is rejected, nothing left can fail.
        status = abort_status(env, deny.code, deny.reason_code, deny.message, {"policy": policy})
        model.reject(
            env, deny.reason_code, deny.message, status_code=deny.code.value[0], actor=k.ACTOR_ADMISSION
        )
        self._count(env, OUTCOME_DENIED, None)
        self._emit(call)
        return status

    def _count(self, env: ExecutionEnvelope, outcome: int, granted: Resources | None) -> None:
        """Metrics are best effort, like the span: a failure must not turn a
        decision already made into another."""
        try:
            self.metrics.record(env.execution.kind, env.principal.tenant, outcome, env.requested, granted)
        except Exception:
            _log.exception("could not count envelope %s in the metrics", env.envelope_id)

    # -- after the handler -------------------------------------------------------------

    def end(self, call: Call, context: Any, error: BaseException | None = None) -> None:
        """Record the terminal state from the handler's result and report the
        envelope; ``error`` is what the handler raised, if anything."""
        if call.ended:
            return
        if not (call.materialized and model.is_terminal(call.env)):
            call.end(*_status(context, error))
            # A handler that set its own trailing metadata replaced ours: add them back.
            pairs = context.trailing_metadata() or ()
            kept = with_trailers(call, pairs)
            if kept is not pairs:
                context.set_trailing_metadata(kept)
        self._emit(call)

    def _emit(self, call: Call) -> None:
        call.ended = True
        try:
            if call.span.is_recording():
                annotate(call.span, call.env, call.progress())
        except Exception:  # the span is best effort; the audit record is not
            _log.exception("could not annotate the span of envelope %s", call.env.envelope_id)
        if call.release:
            env = call.envelope()
            for policy in call.release:
                try:
                    policy.release(env)
                except Exception:  # giving back must never fail the call; it is logged
                    _log.exception("policy %r failed to release envelope %s", policy, env.envelope_id)
        if self.dispatcher is not None:
            self.dispatcher.submit(call.envelope)  # built on the dispatcher's thread

    def sink_stats(self) -> SinkStats | None:
        """The audit dispatcher's counters, when sinks are configured."""
        return self.dispatcher.stats() if self.dispatcher is not None else None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every envelope reported so far was handed to the sinks."""
        return self.dispatcher.flush(timeout) if self.dispatcher is not None else True

    def close(self) -> None:
        """Flush and close the audit sinks."""
        if self.dispatcher is not None:
            self.dispatcher.close()


def _declared(env: ExecutionEnvelope, found: Extraction) -> None:
    """Tenant and project a request declares are untrusted: they fill the
    principal only for an unauthenticated caller; for an authenticated one a
    different claim is kept as a scope hint, never as identity."""
    principal = env.principal
    for part, claimed in (("tenant", found.tenant), ("project", found.project)):
        if not claimed or claimed == getattr(principal, part):
            continue
        if principal.auth_method == AUTH_NONE and not getattr(principal, part):
            setattr(principal, part, claimed)
        elif len(env.scope.hints) < k.MAX_MAP_ENTRIES:
            env.scope.hints[f"declared_{part}"] = claimed


def _negative(env: ExecutionEnvelope) -> tuple[str, Deny] | None:
    """A denial for negative requested quantities (which are dropped from the
    envelope, so that it stays valid), or None."""
    negative = [
        field.name for field, value in env.requested.ListFields() if isinstance(value, int) and value < 0
    ]
    if not negative:
        return None
    for name in negative:
        env.requested.ClearField(name)
    message = f"requested {', '.join(negative)} must not be negative"
    return "extractor", Deny(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESOURCE", message, BASIS_INVALID)


_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}


def _status(context: Any, error: BaseException | None) -> tuple[grpc.StatusCode, str]:
    code = context.code()
    details = context.details()
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    if isinstance(code, int):  # grpc.aio reports the numeric code
        code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    if code is not None and code is not grpc.StatusCode.OK:
        return code, details or ""
    if isinstance(error, asyncio.CancelledError | GeneratorExit) or _cancelled(context):
        if context.time_remaining() == 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        return grpc.StatusCode.CANCELLED, "cancelled by the client"
    if error is not None:
        return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"
    return grpc.StatusCode.OK, details or ""


def _cancelled(context: Any) -> bool:
    """Whether the client cancelled the call or its deadline passed (which
    neither grpc's is_active nor grpc.aio's cancelled may say yet)."""
    is_active = getattr(context, "is_active", None)  # grpc
    if is_active is not None and not is_active():
        return True
    cancelled = getattr(context, "cancelled", None)  # grpc.aio
    if cancelled is not None and cancelled():
        return True
    return bool(context.time_remaining() == 0)


def trailers(envelope_id: str, outcome: int) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the envelope and its admission outcome."""
    return ((k.ENVELOPE_ID_METADATA, envelope_id), (k.DECISION_METADATA, OUTCOME_NAMES[outcome]))


def call_trailers(call: Call) -> tuple[tuple[str, str], ...]:
    """The trailers of an admitted call."""
    outcome = call.admission.outcome if call.admission is not None else OUTCOME_UNSPECIFIED
    return trailers(call.env.envelope_id, outcome)


def with_trailers(call: Call, pairs: _Pairs) -> _Pairs:
    """Trailing metadata ``pairs`` with the call's trailers: ``pairs`` itself
    when they are there already (a status from the handler API carries them)."""
    if any(key == k.ENVELOPE_ID_METADATA for key, _ in pairs):
        return pairs
    return (*pairs, *call_trailers(call))


def abort_status(
    env: ExecutionEnvelope, code: grpc.StatusCode, reason_code: str, message: str, extra: Mapping[str, str]
) -> AbortStatus:
    """A status carrying a google.rpc.Status with an ErrorInfo (reason, domain,
    the envelope id) and the envelope's trailers."""
    info = error_details_pb2.ErrorInfo(
        reason=reason_code, domain=k.ERROR_DOMAIN, metadata={"envelope_id": env.envelope_id, **extra}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    rich = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    pairs = trailers(env.envelope_id, env.decision.outcome)
    return AbortStatus(code, message, (("grpc-status-details-bin", rich.SerializeToString()), *pairs))


def envelope_context(env: ExecutionEnvelope) -> bytes:
    """The compact EnvelopeContext of ``env`` for downstream metadata."""
    lineage = env.lineage
    return EnvelopeContext(
        envelope_id=env.envelope_id,
        root_envelope_id=lineage.root_envelope_id,
        depth=lineage.depth,
        kind=env.execution.kind,
    ).SerializeToString()
