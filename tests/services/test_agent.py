"""The agent workflow service calling the real inference service downstream:
lineage, one trace across both services, budgets, streaming and failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import envelope_grpc
from envelope_grpc import EnvelopeConfig, JwtResolver, Limit, LimitsPolicy
from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    DecisionOutcome,
    ExecutionEnvelope,
    ExecutionKind,
    GrantStage,
    LifecycleState,
    ResourceDimension,
)
from services import _runtime, agent, inference
from services.agent import service as agent_service
from services.agent.__main__ import run as agent_main
from services.agent.v1 import agent_pb2 as pb
from services.agent.v1 import agent_pb2_grpc as pb_grpc
from services.inference import models
from tests.conftest import Collector, first_grant

STATE = LifecycleState
OUTCOME = DecisionOutcome
COMPLETED = pb.StepStatus.STEP_STATUS_COMPLETED
SKIPPED = pb.StepStatus.STEP_STATUS_SKIPPED
GOAL = "plan a search over the graph"


class Stack:
    """Inference and agent services on loopback, traced into one in-memory
    exporter; each keeps its envelopes."""

    def __init__(
        self,
        *,
        inference_address: str | None = None,
        traced_client: bool = True,
        policies: Any = (),
        resolvers: Any = (),
    ) -> None:
        self.spans = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.inference_envelopes = Collector()
        self.agent_envelopes = Collector()
        self.inference = _runtime.start(
            inference.services(),
            EnvelopeConfig(
                sinks=[self.inference_envelopes], trust_peer=_runtime.trusted_loopback, resolvers=resolvers
            ),
            provider=self.provider,
        )
        self.agent = _runtime.start(
            agent.services(
                inference_address or self.inference.address,
                tracer_provider=self.provider if traced_client else None,
            ),
            EnvelopeConfig(sinks=[self.agent_envelopes], policies=policies, resolvers=resolvers),
            provider=self.provider,
        )
        self.channel = grpc.insecure_channel(self.agent.address)
        self.stub = pb_grpc.AgentServiceStub(self.channel)
        self._stopped = False

    def run(self, request: pb.RunWorkflowRequest, metadata: Any = None) -> tuple[pb.RunWorkflowResponse, str]:
        """RunWorkflow; the response and the run's envelope id from the trailers."""
        response, call = self.stub.RunWorkflow.with_call(request, timeout=30, metadata=metadata)
        return response, str(dict(call.trailing_metadata())["x-execution-envelope-id"])

    def finish(self) -> tuple[list[ExecutionEnvelope], list[ExecutionEnvelope]]:
        """Stop both servers (which flushes their audit sinks); every envelope
        each reported, all checked valid."""
        if not self._stopped:
            self._stopped = True
            self.channel.close()
            self.agent.stop()
            self.inference.stop()
        runs, children = list(self.agent_envelopes.envelopes), list(self.inference_envelopes.envelopes)
        for env in [*runs, *children]:
            assert envelope_grpc.validate(env) == [], envelope_grpc.to_json(env)
        return runs, children

    def close(self) -> None:
        self.finish()
        self.provider.shutdown()


@pytest.fixture
def stack() -> Iterator[Stack]:
    started = Stack()
    yield started
    started.close()


def spans_of(exporter: InMemorySpanExporter, kind: SpanKind, count: int) -> list[ReadableSpan]:
    deadline = time.monotonic() + 5
    while True:
        found = [span for span in exporter.get_finished_spans() if span.kind is kind]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def tool_steps(response: pb.RunWorkflowResponse) -> list[pb.Step]:
    assert response.steps[0].kind == pb.StepKind.STEP_KIND_PLAN
    return list(response.steps[1:])


def test_fan_out_lineage_and_one_trace(stack: Stack) -> None:
    request = pb.RunWorkflowRequest(
        workflow="research",
        goal=GOAL,
        tenant="acme",
        budget=pb.Budget(max_tokens=100, max_tool_calls=5),
        fan_out=3,
    )
    response, run_id = stack.run(request)
    assert response.envelope_id == run_id
    steps = tool_steps(response)
    assert [s.index for s in response.steps] == [0, 1, 2, 3]
    assert [s.kind for s in steps] == [
        pb.StepKind.STEP_KIND_GENERATE,
        pb.StepKind.STEP_KIND_EMBED,
        pb.StepKind.STEP_KIND_GENERATE,
    ]
    assert all(s.status == COMPLETED for s in steps)
    assert [s.model for s in steps] == ["tiny-lm/1", "text-embedder/1", "tiny-lm/1"]
    assert response.tool_calls == 3
    assert not response.budget_exhausted
    tasks = agent_service.subtasks(GOAL, 3, "research")
    assert response.steps[0].output == "; ".join(tasks)
    assert [s.input for s in steps] == tasks
    # The tools' results are the models' own.
    assert steps[0].output == " ".join(models.LM_VOCAB[t] for t in models.lm_generate(tasks[0], 16))
    embedded = models.TextEmbedder().run({"text": np.array([tasks[1].encode()], dtype=np.object_)}, 16)
    np.testing.assert_allclose(steps[1].embedding, embedded.outputs["embedding"][0], rtol=1e-6)
    assert response.tokens_used == sum(s.tokens_used for s in steps) > 0
    assert all(0 < s.tokens_used <= s.tokens_allowed == 16 for s in steps)

    runs, children = stack.finish()
    (run,) = runs
    assert run.envelope_id == run_id
    assert run.execution.kind == ExecutionKind.EXECUTION_KIND_AGENT_WORKFLOW
    assert (run.execution.target.type, run.execution.target.name) == ("workflow", "research")
    assert run.execution.target.attributes["max_tool_calls"] == "5"
    assert run.principal.tenant == "acme"
    assert (run.requested.tokens, run.requested.concurrency) == (100, 3)
    assert not run.lineage.parent_envelope_id
    assert run.lineage.depth == 0
    backend = first_grant(run, GrantStage.GRANT_STAGE_BACKEND)
    assert backend.outcome == OUTCOME.DECISION_OUTCOME_ADMITTED
    assert (backend.resources.tokens, backend.resources.concurrency) == (100, 3)
    assert run.binding.endpoint == stack.inference.address
    assert run.binding.runtime == "envelope-grpc-agent"
    assert run.outcome.usage.tokens == response.tokens_used
    assert run.lifecycle.state == STATE.LIFECYCLE_STATE_COMPLETED

    assert len(children) == 3
    assert {child.envelope_id for child in children} == {s.envelope_id for s in steps}
    for child in children:
        assert child.lineage.parent_envelope_id == run_id
        assert child.lineage.root_envelope_id == run_id
        assert child.lineage.depth == 1
        assert child.execution.kind == ExecutionKind.EXECUTION_KIND_INFERENCE
        assert child.principal.tenant == "acme"
        assert child.requested.tokens == 16
        assert child.lifecycle.state == STATE.LIFECYCLE_STATE_COMPLETED
    by_id = {child.envelope_id: child for child in children}
    assert [by_id[s.envelope_id].execution.target.name for s in steps] == [
        "tiny-lm",
        "text-embedder",
        "tiny-lm",
    ]
    assert sum(child.outcome.usage.tokens for child in children) == response.tokens_used

    # One trace: every envelope, every server span, every client span.
    assert run.trace_id
    assert {env.trace_id for env in [run, *children]} == {run.trace_id}
    servers = spans_of(stack.spans, SpanKind.SERVER, 4)
    clients = spans_of(stack.spans, SpanKind.CLIENT, 3)
    assert len(servers) == 4
    assert len(clients) == 3
    assert {format(span.context.trace_id, "032x") for span in [*servers, *clients]} == {run.trace_id}
    agent_span = next(span for span in servers if span.name.endswith("/RunWorkflow"))
    assert format(agent_span.context.span_id, "016x") == run.span_id
    client_ids = {span.context.span_id for span in clients}
    assert all(
        span.parent is not None and span.parent.span_id == agent_span.context.span_id for span in clients
    )
    inference_spans = [span for span in servers if span is not agent_span]
    assert all(span.parent is not None and span.parent.span_id in client_ids for span in inference_spans)
    assert {format(span.context.span_id, "016x") for span in inference_spans} == {c.span_id for c in children}


def test_one_tool_call_budget(stack: Stack) -> None:
    request = pb.RunWorkflowRequest(
        workflow="research", goal=GOAL, budget=pb.Budget(max_tool_calls=1, max_tokens=50), fan_out=3
    )
    response, run_id = stack.run(request)
    steps = tool_steps(response)
    assert [s.status for s in steps] == [COMPLETED, SKIPPED, SKIPPED]
    assert [s.reason_code for s in steps[1:]] == ["TOOL_CALL_BUDGET", "TOOL_CALL_BUDGET"]
    assert not steps[1].envelope_id
    assert not steps[2].envelope_id
    assert response.tool_calls == 1
    assert response.budget_exhausted

    runs, children = stack.finish()
    (run,) = runs
    (child,) = children  # exactly one inference call
    assert child.envelope_id == steps[0].envelope_id
    assert (child.lineage.parent_envelope_id, child.lineage.root_envelope_id) == (run_id, run_id)
    backend = first_grant(run, GrantStage.GRANT_STAGE_BACKEND)
    assert backend.outcome == OUTCOME.DECISION_OUTCOME_NARROWED
    assert (backend.resources.tokens, backend.resources.concurrency) == (50, 1)
    assert backend.reason_code == "TOOL_CALL_BUDGET"
    assert run.outcome.usage.tokens == steps[0].tokens_used == child.outcome.usage.tokens


def test_token_budget(stack: Stack) -> None:
    request = pb.RunWorkflowRequest(
        workflow="brainstorm",
        goal=GOAL,
        budget=pb.Budget(max_tokens=10),
        steps=4,
        fan_out=4,
        step_max_tokens=4,
    )
    response, _ = stack.run(request)
    steps = tool_steps(response)
    tasks = agent_service.subtasks(GOAL, 4, "brainstorm")
    # 4 + 4 + 2 tokens reserved at once; each generation uses all it is allowed
    # (the model would go on for longer), so nothing comes back for step 4.
    assert all(len(models.lm_generate(task, 64)) > 4 for task in tasks)
    assert [(s.status, s.tokens_allowed, s.tokens_used) for s in steps] == [
        (COMPLETED, 4, 4),
        (COMPLETED, 4, 4),
        (COMPLETED, 2, 2),
        (SKIPPED, 0, 0),
    ]
    assert steps[3].reason_code == "TOKEN_BUDGET"
    assert response.tokens_used == 10
    assert response.answer.split("\n")[2] == " ".join(
        models.LM_VOCAB[t] for t in models.lm_generate(tasks[2], 2)
    )

    nothing, _ = stack.run(pb.RunWorkflowRequest(workflow="index", goal=GOAL, budget=pb.Budget(max_tokens=0)))
    assert [s.status for s in tool_steps(nothing)] == [SKIPPED] * agent_service.DEFAULT_STEPS
    assert (nothing.tool_calls, nothing.tokens_used) == (0, 0)

    runs, children = stack.finish()
    assert len(children) == 3
    assert sorted(child.requested.tokens for child in children) == [2, 4, 4]
    first, second = runs
    assert first.outcome.usage.tokens == 10
    assert first.execution.target.attributes["steps"] == "4"
    assert second.requested.tokens == 0
    assert second.requested.HasField("tokens")
    assert second.outcome.usage.tokens == 0
    widened = first_grant(second, GrantStage.GRANT_STAGE_BACKEND)  # no fan-out asked: all 3 steps at once
    assert (widened.outcome, widened.resources.concurrency) == (OUTCOME.DECISION_OUTCOME_WIDENED, 3)
    assert widened.reason_code == "FAN_OUT_FROM_STEPS"


def test_admission_narrows_the_budget() -> None:
    limits = LimitsPolicy(
        [Limit(ResourceDimension.RESOURCE_DIMENSION_TOKENS, 20, ExecutionKind.EXECUTION_KIND_AGENT_WORKFLOW)]
    )
    stack = Stack(policies=[limits])
    try:
        response, _ = stack.run(
            pb.RunWorkflowRequest(
                workflow="brainstorm", goal=GOAL, budget=pb.Budget(max_tokens=500), fan_out=2
            )
        )
        assert response.tokens_used <= 20
        assert [s.tokens_allowed for s in tool_steps(response)] == [16, 4]
        (run,), _ = stack.finish()
        assert run.decision.outcome == OUTCOME.DECISION_OUTCOME_NARROWED
        backend = first_grant(run, GrantStage.GRANT_STAGE_BACKEND)
        assert (backend.outcome, backend.resources.tokens) == (OUTCOME.DECISION_OUTCOME_NARROWED, 20)
        assert backend.reason_code == run.decision.reason_code
    finally:
        stack.close()


def test_stream_workflow(stack: Stack) -> None:
    request = pb.StreamWorkflowRequest(
        run=pb.RunWorkflowRequest(
            workflow="index", goal=GOAL, tenant="globex", fan_out=2, budget=pb.Budget(max_tokens=64)
        )
    )
    events = list(stack.stub.StreamWorkflow(request, timeout=30))
    assert [event.WhichOneof("event") for event in events] == ["step", "step", "step", "result"]
    assert events[0].step.kind == pb.StepKind.STEP_KIND_PLAN
    assert sorted(event.step.index for event in events[1:3]) == [1, 2]
    result = events[-1].result
    assert [s.index for s in result.steps] == [0, 1, 2]
    assert all(
        s.kind == pb.StepKind.STEP_KIND_EMBED and len(s.embedding) == models.EMBEDDING_DIM
        for s in result.steps[1:]
    )

    runs, children = stack.finish()
    (run,) = runs
    assert run.envelope_id == result.envelope_id
    assert run.execution.method == "/services.agent.v1.AgentService/StreamWorkflow"
    assert (run.requested.tokens, run.requested.concurrency, run.principal.tenant) == (64, 2, "globex")
    assert run.outcome.usage.response_messages == 4
    assert len(children) == 2
    assert all(child.lineage.parent_envelope_id == run.envelope_id for child in children)
    assert all(child.principal.tenant == "globex" for child in children)
    assert {env.trace_id for env in [run, *children]} == {run.trace_id}


def test_invalid_requests(stack: Stack) -> None:
    cases = [
        (
            pb.RunWorkflowRequest(workflow="nope", goal=GOAL),
            grpc.StatusCode.NOT_FOUND,
            "unknown workflow 'nope'",
        ),
        (
            pb.RunWorkflowRequest(workflow="research", goal="  "),
            grpc.StatusCode.INVALID_ARGUMENT,
            "goal is empty",
        ),
        (
            pb.RunWorkflowRequest(workflow="research", goal=GOAL, fan_out=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "fan_out must be at least 1",
        ),
        (
            pb.RunWorkflowRequest(workflow="research", goal=GOAL, steps=99),
            grpc.StatusCode.INVALID_ARGUMENT,
            "steps must be at most 32",
        ),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as raised:
            stack.run(request)
        assert raised.value.code() is code
        assert text in (raised.value.details() or "")
    runs, children = stack.finish()
    assert children == []
    assert [env.lifecycle.state for env in runs] == [STATE.LIFECYCLE_STATE_FAILED] * len(cases)
    assert [env.outcome.status_code for env in runs] == [code.value[0] for _, code, _ in cases]
    assert not any(env.HasField("binding") for env in runs)


def test_inference_unreachable() -> None:
    stack = Stack(inference_address="127.0.0.1:1")
    try:
        with pytest.raises(grpc.RpcError) as raised:
            stack.run(pb.RunWorkflowRequest(workflow="research", goal=GOAL, fan_out=2))
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "every tool call failed" in (raised.value.details() or "")
        (run,), children = stack.finish()
        assert children == []
        assert run.lifecycle.state == STATE.LIFECYCLE_STATE_FAILED
        assert run.binding.endpoint == "127.0.0.1:1"
        assert run.outcome.usage.tokens == 0
    finally:
        stack.close()


def test_untraced_client_still_carries_the_trace() -> None:
    """Without a tracer provider for the client spans (as under
    `python -m services.agent`), the trace context still goes downstream."""
    stack = Stack(traced_client=False)
    try:
        stack.run(pb.RunWorkflowRequest(workflow="brainstorm", goal=GOAL, fan_out=2))
        (run,), children = stack.finish()
        assert len(children) == 2
        assert run.trace_id
        assert {child.trace_id for child in children} == {run.trace_id}
        assert all(child.lineage.parent_envelope_id == run.envelope_id for child in children)
        assert spans_of(stack.spans, SpanKind.CLIENT, 0) == []
    finally:
        stack.close()


def test_make_plan_without_an_envelope() -> None:
    plan = agent_service.make_plan(
        pb.RunWorkflowRequest(workflow="research", goal="Index THE data lake", fan_out=20, steps=12), None
    )
    assert plan.width == agent_service.MAX_FAN_OUT
    assert plan.tokens == agent_service.DEFAULT_TOKEN_BUDGET
    assert plan.tool_calls == 12
    assert plan.tasks[0] == (pb.StepKind.STEP_KIND_GENERATE, "Index THE data lake index")
    assert plan.tasks[1] == (pb.StepKind.STEP_KIND_EMBED, "Index THE data lake data")
    assert plan.reason_code == "DEFAULT_TOKEN_BUDGET"
    assert "at most 8 tool steps run at once" in plan.reason


def test_main_parses_the_inference_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        agent_main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--inference HOST:PORT" in out
    assert "127.0.0.1:8001" in out
    assert "--port" in out
    assert "--audit" in out


def test_tool_calls_act_for_the_caller_with_its_credential() -> None:
    secret = b"s" * 32
    resolver = JwtResolver(keys=secret, algorithms=["HS256"], issuer="https://idp.test", audience="backend")
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": "alice",
            "tenant": "acme",
            "iss": "https://idp.test",
            "aud": "backend",
            "exp": now + 300,
            "nbf": now,
            "iat": now,
        },
        secret,
        algorithm="HS256",
    )
    stack = Stack(resolvers=[resolver])
    try:
        request = pb.RunWorkflowRequest(
            workflow="research", goal=GOAL, budget=pb.Budget(max_tokens=64, max_tool_calls=2), fan_out=2
        )
        response, run_id = stack.run(request, metadata=(("authorization", f"Bearer {token}"),))
        assert response.tool_calls == 2
        runs, children = stack.finish()
    finally:
        stack.close()
    (run,) = runs
    assert len(children) == 2
    for env in (run, *children):
        principal = env.principal
        assert (principal.subject, principal.tenant, principal.auth_method) == (
            "alice",
            "acme",
            AuthMethod.AUTH_METHOD_JWT,
        )
    assert {child.lineage.parent_envelope_id for child in children} == {run_id}
