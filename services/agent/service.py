"""The agent workflow servicer: a planner step, then a fan-out of tool steps
calling the inference service downstream, within the caller's budget.

The run's envelope (built from the proto annotations: AGENT_WORKFLOW, the
workflow as target, TOKENS from ``budget.max_tokens``, CONCURRENCY from
``fan_out``) gets the backend's steps:

- a final grant: the token budget the run works with (the admission grant's,
  or the default when none was asked) and the fan-out width it actually uses
  (capped at MAX_FAN_OUT, the number of planned steps and the tool-call
  budget), with a reason whenever it differs from the request;
- a binding: this node, runtime "envelope-grpc-agent", the inference
  service's address as endpoint;
- usage: the tokens all tool steps used.

Budget enforcement: before a tool step starts it reserves
``min(step_max_tokens, tokens left)`` tokens and one tool call; a step ends
by giving back what it did not use. A step that finds no tool call left, or
no token left once the running steps have ended, is SKIPPED and no call is
made. Every downstream call carries the run's envelope (lineage), the
trace context and the caller's bearer credential (``authorization``), so
that the inference service admits each step as the caller; its envelope id,
read from the call's trailing metadata, is recorded on the step.
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import socket
from collections.abc import Iterator, Mapping
from concurrent import futures
from typing import Final

import grpc
from opentelemetry.trace import TracerProvider

import envelope_grpc
from envelope_grpc.v1.envelope_pb2 import Binding, ExecutionEnvelope, Resources, Usage
from services._handler import abort, admission_grant
from services.agent.tools import Credentials, InferenceTools, ToolError, ToolResult
from services.agent.v1 import agent_pb2, agent_pb2_grpc
from services.agent.v1.agent_pb2 import RunWorkflowRequest, RunWorkflowResponse, Step, StepKind, StepStatus

PLAN: Final = StepKind.STEP_KIND_PLAN
GENERATE: Final = StepKind.STEP_KIND_GENERATE
EMBED: Final = StepKind.STEP_KIND_EMBED
COMPLETED: Final = StepStatus.STEP_STATUS_COMPLETED
FAILED: Final = StepStatus.STEP_STATUS_FAILED
SKIPPED: Final = StepStatus.STEP_STATUS_SKIPPED

#: The tool kinds of each workflow, cycled over its steps.
WORKFLOWS: Final[Mapping[str, tuple[StepKind.ValueType, ...]]] = {
    "research": (GENERATE, EMBED),
    "brainstorm": (GENERATE,),
    "index": (EMBED,),
}
#: Most tool steps running at once.
MAX_FAN_OUT: Final = 8
#: Most tool steps in a plan.
MAX_STEPS: Final = 32
#: Tool steps planned when neither ``steps`` nor ``fan_out`` is set.
DEFAULT_STEPS: Final = 3
#: Tokens a run may use when the caller sets no budget.
DEFAULT_TOKEN_BUDGET: Final = 256
#: Tokens one tool step may use when the caller does not say.
DEFAULT_STEP_TOKENS: Final = 16
#: Runtime named in the binding.
RUNTIME: Final = "envelope-grpc-agent"

_WORD = re.compile(r"[a-z0-9']+")
_STOPWORDS: Final = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "how", "in", "into", "is", "it"}
    | {"of", "on", "or", "that", "the", "this", "to", "what", "why", "with"}
)


class WorkflowError(Exception):
    """A request the workflow cannot run; the message is for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do and within which limits."""

    workflow: str
    goal: str
    tenant: str
    tasks: tuple[tuple[StepKind.ValueType, str], ...]
    width: int
    tokens: int
    tool_calls: int
    step_tokens: int
    granted: Resources
    reason_code: str
    reason: str


def subtasks(goal: str, count: int, fallback: str) -> list[str]:
    """The planner: one sub-task per step, the goal focused on each of its
    keywords in turn."""
    keywords = list(dict.fromkeys(w for w in _WORD.findall(goal.lower()) if w not in _STOPWORDS))
    keywords = keywords or [fallback]
    return [f"{goal.strip()} {keywords[index % len(keywords)]}" for index in range(count)]


def _check(request: RunWorkflowRequest) -> None:
    if request.workflow not in WORKFLOWS:
        raise WorkflowError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown workflow {request.workflow!r}; workflows: {', '.join(sorted(WORKFLOWS))}",
        )
    if not request.goal.strip():
        raise WorkflowError(grpc.StatusCode.INVALID_ARGUMENT, "the goal is empty")
    budget = request.budget
    for name, present, value, least in (
        ("budget.max_tokens", budget.HasField("max_tokens"), budget.max_tokens, 0),
        ("budget.max_tool_calls", budget.HasField("max_tool_calls"), budget.max_tool_calls, 0),
        ("fan_out", request.HasField("fan_out"), request.fan_out, 1),
        ("steps", request.HasField("steps"), request.steps, 1),
        ("step_max_tokens", request.HasField("step_max_tokens"), request.step_max_tokens, 1),
    ):
        if present and value < least:
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be at least {least}, got {value}"
            )
    if request.HasField("steps") and request.steps > MAX_STEPS:
        raise WorkflowError(
            grpc.StatusCode.INVALID_ARGUMENT, f"steps must be at most {MAX_STEPS}, got {request.steps}"
        )


def make_plan(request: RunWorkflowRequest, env: ExecutionEnvelope | None) -> Plan:
    """Check the request and decide the run's limits (see the module doc).
    Raises WorkflowError."""
    _check(request)
    if request.HasField("steps"):
        steps = request.steps
    elif request.HasField("fan_out"):
        steps = min(request.fan_out, MAX_STEPS)
    else:
        steps = DEFAULT_STEPS
    budget = request.budget
    tool_calls = budget.max_tool_calls if budget.HasField("max_tool_calls") else steps

    admission = admission_grant(env)
    granted = Resources()
    if admission is not None:
        granted.CopyFrom(admission.resources)
    reasons: list[tuple[str, str]] = []
    if admission is not None and admission.reason_code:
        reasons.append((admission.reason_code, admission.reason))

    if granted.HasField("tokens"):
        tokens = granted.tokens
    elif budget.HasField("max_tokens"):
        tokens = budget.max_tokens
    else:
        tokens = DEFAULT_TOKEN_BUDGET
        reasons.append(("DEFAULT_TOKEN_BUDGET", f"no token budget asked; the default of {tokens} applies"))

    width = request.fan_out if request.HasField("fan_out") else steps
    if not request.HasField("fan_out"):
        reasons.append(("FAN_OUT_FROM_STEPS", f"no fan-out asked; the {steps} planned steps run at once"))
    if granted.HasField("concurrency"):
        width = min(width, granted.concurrency)
    for code, limit, why in (
        ("FAN_OUT_LIMIT", MAX_FAN_OUT, f"at most {MAX_FAN_OUT} tool steps run at once"),
        ("FAN_OUT_ABOVE_STEPS", steps, f"only {steps} tool steps are planned"),
        ("TOOL_CALL_BUDGET", tool_calls, f"the budget allows {tool_calls} tool calls"),
    ):
        if width > limit:
            width = limit
            reasons.append((code, why))
    granted.tokens = tokens
    granted.concurrency = width

    kinds = WORKFLOWS[request.workflow]
    tasks = subtasks(request.goal, steps, request.workflow)
    return Plan(
        workflow=request.workflow,
        goal=request.goal,
        tenant=request.tenant or (env.principal.tenant if env is not None else ""),
        tasks=tuple((kinds[index % len(kinds)], task) for index, task in enumerate(tasks)),
        width=width,
        tokens=tokens,
        tool_calls=tool_calls,
        step_tokens=request.step_max_tokens if request.HasField("step_max_tokens") else DEFAULT_STEP_TOKENS,
        granted=granted,
        reason_code=reasons[0][0] if reasons else "WORKFLOW_LIMITS",
        reason="; ".join(why for _, why in reasons) or "the workflow's own limits",
    )


def _skipped(index: int, kind: StepKind.ValueType, task: str, code: str, why: str) -> Step:
    return Step(index=index, kind=kind, status=SKIPPED, input=task, reason_code=code, reason=why)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Runs workflows against the inference service at ``inference_address``."""

    def __init__(
        self,
        inference_address: str,
        *,
        tracer_provider: TracerProvider | None = None,
        tools: InferenceTools | None = None,
        node: str | None = None,
    ) -> None:
        self.tools = tools or InferenceTools(inference_address, tracer_provider=tracer_provider)
        self.node = node or socket.gethostname()

    def RunWorkflow(self, request: RunWorkflowRequest, context: grpc.ServicerContext) -> RunWorkflowResponse:
        result: RunWorkflowResponse | None = None
        for event in self._run(request, context):
            if isinstance(event, RunWorkflowResponse):
                result = event
        assert result is not None
        return result

    def StreamWorkflow(
        self, request: agent_pb2.StreamWorkflowRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.StreamWorkflowResponse]:
        for event in self._run(request.run, context):
            if isinstance(event, Step):
                yield agent_pb2.StreamWorkflowResponse(step=event)
            else:
                yield agent_pb2.StreamWorkflowResponse(result=event)

    # -- the run -----------------------------------------------------------------------

    def _run(
        self, request: RunWorkflowRequest, context: grpc.ServicerContext
    ) -> Iterator[Step | RunWorkflowResponse]:
        env = envelope_grpc.current_envelope()
        try:
            plan = make_plan(request, env)
        except WorkflowError as error:
            abort(context, error.code, error.message)
        if env is not None:
            envelope_grpc.record_grant(plan.granted, reason_code=plan.reason_code, reason=plan.reason)
            envelope_grpc.record_binding(
                Binding(
                    node=self.node,
                    runtime=RUNTIME,
                    endpoint=self.tools.address,
                    attributes={"workflow": plan.workflow, "steps": str(len(plan.tasks))},
                )
            )
        planner = Step(
            index=0,
            kind=PLAN,
            status=COMPLETED,
            input=plan.goal,
            output="; ".join(task for _, task in plan.tasks),
        )
        yield planner
        # The steps act for the caller: its credential goes with each of them.
        credentials = tuple(
            (key, value) for key, value in context.invocation_metadata() or () if key == "authorization"
        )
        ended: dict[int, Step] = {}
        for step in self._execute(plan, credentials):
            ended[step.index] = step
            yield step
        tools = [ended[index] for index in sorted(ended)]
        used = sum(step.tokens_used for step in tools)
        calls = sum(1 for step in tools if step.status != SKIPPED)
        if env is not None:
            envelope_grpc.record_usage(Usage(tokens=used))
        if calls and not any(step.status == COMPLETED for step in tools):
            failures = "; ".join(
                f"step {s.index}: {s.reason_code} {s.reason}" for s in tools if s.status == FAILED
            )
            abort(context, grpc.StatusCode.UNAVAILABLE, f"every tool call failed ({failures})")
        yield RunWorkflowResponse(
            envelope_id=env.envelope_id if env is not None else "",
            workflow=plan.workflow,
            steps=[planner, *tools],
            tokens_used=used,
            tool_calls=calls,
            budget_exhausted=any(step.status == SKIPPED for step in tools),
            answer="\n".join(
                step.output for step in tools if step.kind == GENERATE and step.status == COMPLETED
            ),
        )

    def _execute(self, plan: Plan, credentials: Credentials) -> Iterator[Step]:
        """Run the tool steps, at most ``plan.width`` at once, within the
        budget, each sending ``credentials``; yields each step as it ends."""
        tokens_left = plan.tokens
        calls_left = plan.tool_calls
        pending: set[futures.Future[Step]] = set()

        def collect(when: str) -> Iterator[Step]:
            nonlocal tokens_left
            done, _ = futures.wait(pending, return_when=when)
            for future in sorted(done, key=lambda f: f.result().index):
                pending.discard(future)
                step = future.result()
                tokens_left += step.tokens_allowed - step.tokens_used
                yield step

        with futures.ThreadPoolExecutor(
            max_workers=max(plan.width, 1), thread_name_prefix="agent-tool"
        ) as pool:
            for index, (kind, task) in enumerate(plan.tasks, start=1):
                while pending and len(pending) >= plan.width:
                    yield from collect(futures.FIRST_COMPLETED)
                if calls_left <= 0:
                    yield _skipped(
                        index,
                        kind,
                        task,
                        "TOOL_CALL_BUDGET",
                        f"the budget allows {plan.tool_calls} tool calls",
                    )
                    continue
                if tokens_left <= 0 and pending:  # running steps may give tokens back
                    yield from collect(futures.ALL_COMPLETED)
                if tokens_left <= 0:
                    yield _skipped(
                        index, kind, task, "TOKEN_BUDGET", f"the budget of {plan.tokens} tokens is spent"
                    )
                    continue
                allowed = min(plan.step_tokens, tokens_left)
                tokens_left -= allowed
                calls_left -= 1
                # Each step runs in a copy of this context: the envelope (for the
                # lineage) and the server span (for the trace) go along.
                context = contextvars.copy_context()
                pending.add(
                    pool.submit(context.run, self._tool, index, kind, task, allowed, plan.tenant, credentials)
                )
            while pending:
                yield from collect(futures.FIRST_COMPLETED)

    def _tool(
        self,
        index: int,
        kind: StepKind.ValueType,
        task: str,
        allowed: int,
        tenant: str,
        credentials: Credentials,
    ) -> Step:
        step = Step(index=index, kind=kind, input=task, tokens_allowed=allowed)
        try:
            if kind == EMBED:
                result: ToolResult = self.tools.embed(task, allowed, tenant=tenant, credentials=credentials)
                step.embedding.extend(result.embedding)
                step.output = f"{len(result.embedding)}-dimensional embedding of {result.tokens} tokens"
            else:
                result = self.tools.generate(task, allowed, tenant=tenant, credentials=credentials)
                step.output = result.text
        except ToolError as error:
            step.status = FAILED
            step.model = error.model
            step.envelope_id = error.envelope_id
            step.reason_code = error.code.name
            step.reason = error.details
            return step
        except Exception as error:  # a response the tool cannot read fails the step, not the run
            step.status = FAILED
            step.reason_code = "TOOL_ERROR"
            step.reason = f"{type(error).__name__}: {error}"
            return step
        step.status = COMPLETED
        step.model = result.model
        step.envelope_id = result.envelope_id
        step.tokens_used = result.tokens  # as reported: the model honours max_tokens
        return step
