"""The ledger as text: envelope tables and lines, one envelope in full with
its lineage tree, and the stats tables."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import IO, Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from envelope_grpc import _table
from envelope_grpc._envelope import DIMENSION_FIELDS
from envelope_grpc._ledger_stats import LedgerStats
from envelope_grpc._telemetry import (
    AUTH_NAMES,
    CLASSIFICATION_NAMES,
    FLAG_NAMES,
    KIND_NAMES,
    MODE_NAMES,
    OUTCOME_NAMES,
    PRINCIPAL_NAMES,
    STATE_NAMES,
)
from envelope_grpc._values import STAGE_ADMISSION, STAGE_BACKEND
from envelope_grpc.ledger import LineageNode
from envelope_grpc.v1.envelope_pb2 import (
    ExecutionEnvelope,
    Resources,
)

MessageT = TypeVar("MessageT", bound=Message)

#: The envelope table's columns, after the start time.
HEADER: Final = ("started", *_table.HEADER)
_STATUS: Final = {code.value[0]: code.name for code in grpc.StatusCode}
# Fixed widths for lines printed one at a time (tail): no table to measure.
_WIDTHS: Final = (23, 8, 8, 10, 8, 14, 18, 18, 22, 28, 10)


def when(ns: int) -> str:
    """Nanoseconds since the epoch as local time to the millisecond."""
    moment = datetime.datetime.fromtimestamp(ns / 1e9).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _duration(ns: int) -> str:
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f} µs"
    if ns < 10_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.1f} s"


def row(env: ExecutionEnvelope) -> tuple[str, ...]:
    """One envelope as the cells of the ledger's table."""
    return (when(env.lifecycle.start_time.ToNanoseconds()), *_table.row(env))


def table(envelopes: Sequence[ExecutionEnvelope], out: IO[str]) -> None:
    """The envelope table of the demo, with each envelope's start time first."""
    _table.render([row(env) for env in envelopes], out, HEADER)


def line(cells: Sequence[str]) -> str:
    """Cells (made visible) padded to fixed widths, for tables printed a line at a time."""
    padded = (_table.visible(cell).ljust(width) for cell, width in zip(cells, _WIDTHS, strict=False))
    return "  ".join(padded).rstrip()


def visible_copy(message: MessageT) -> MessageT:
    """A copy of ``message`` whose every text (map keys included) is made
    ``_table.visible``, to print."""
    copy = type(message)()
    copy.CopyFrom(message)
    _make_visible(copy)
    return copy


def _make_visible(message: Message) -> None:
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entries = list(value.items())
            message.ClearField(field.name)
            mapped = getattr(message, field.name)
            for key, item in entries:
                key = _table.visible(key) if isinstance(key, str) else key
                if isinstance(item, Message):
                    _make_visible(item)
                    mapped[key].CopyFrom(item)
                else:
                    mapped[key] = _table.visible(item) if isinstance(item, str) else item
        elif field.type == field.TYPE_STRING:
            if field.is_repeated:
                value[:] = [_table.visible(text) for text in value]
            else:
                setattr(message, field.name, _table.visible(value))
        elif field.message_type is not None:
            for item in value if field.is_repeated else (value,):
                _make_visible(item)


# -- one envelope ------------------------------------------------------------------------


def _value(resources: Resources | None, field: Any) -> str:
    if resources is None:
        return ""
    if field == "accelerator_type":
        return resources.accelerator_type
    return str(getattr(resources, field)) if resources.HasField(field) else ""


def tree_rows(node: LineageNode, mark: str = "") -> list[tuple[str, ...]]:
    """The tree drawn with box characters, one envelope a row: id, kind,
    target, state; ``mark`` (an envelope id) gets an arrow."""
    labels: list[tuple[str, ExecutionEnvelope]] = []

    def walk(current: LineageNode, lead: str, branch: str) -> None:
        labels.append((branch + current.envelope.envelope_id[:8], current.envelope))
        for index, child in enumerate(current.children):
            last = index == len(current.children) - 1
            walk(child, lead + ("    " if last else "│   "), lead + ("└── " if last else "├── "))

    walk(node, "", "")
    rows: list[tuple[str, ...]] = [
        (
            label,
            KIND_NAMES.get(env.execution.kind, "?") if env.lifecycle.transitions else "(not recorded)",
            _table.target_label(env, "?") if env.lifecycle.transitions else "",
            STATE_NAMES.get(env.lifecycle.state, "?") if env.lifecycle.transitions else "",
            "◀" if mark and env.envelope_id == mark else "",
        )
        for label, env in labels
    ]
    return rows


def show(env: ExecutionEnvelope, tree: LineageNode | None, out: IO[str]) -> None:
    """Everything about one envelope (a ``visible_copy``), then its lineage tree."""
    env = visible_copy(env)
    write = out.write
    principal = env.principal
    execution = env.execution
    lifecycle = env.lifecycle
    start = lifecycle.start_time.ToNanoseconds()
    write(f"envelope   {env.envelope_id}\n")
    write(f"request    {env.request_id}\n")
    if env.trace_id:
        write(f"trace      {env.trace_id}  span {env.span_id}\n")
    write(f"method     {execution.method}\n")
    target = execution.target
    what = f"{target.type} {_table.target_label(env, '?')}".strip()
    attributes = " ".join(f"{k}={v}" for k, v in sorted(target.attributes.items()))
    kind = KIND_NAMES.get(execution.kind, "?")
    write(f"kind       {kind} · {what}{' · ' + attributes if attributes else ''}\n")
    who = [
        f"{principal.subject or 'anonymous'} ("
        f"{PRINCIPAL_NAMES.get(principal.kind, str(principal.kind))}, "
        f"{AUTH_NAMES.get(principal.auth_method, str(principal.auth_method))})"
    ]
    for label, text in (
        ("tenant", principal.tenant),
        ("project", principal.project),
        ("roles", ",".join(principal.roles)),
        ("on behalf of", ",".join(principal.on_behalf_of)),
    ):
        if text:
            who.append(f"{label} {text}")
    write(f"who        {' · '.join(who)}\n")
    source = [
        f"{label} {text}"
        for label, text in (("from", principal.source_address), ("issuer", principal.issuer))
        if text
    ]
    if source:
        write(f"           {' · '.join(source)}\n")
    scope = env.scope
    scoped = [
        text
        for text in (
            CLASSIFICATION_NAMES.get(scope.data_classification, str(scope.data_classification))
            if scope.data_classification
            else "",
            f"region {scope.region}" if scope.region else "",
            f"purpose {scope.purpose}" if scope.purpose else "",
            f"datasets {','.join(scope.datasets)}" if scope.datasets else "",
            " ".join(f"{k}={v}" for k, v in sorted(scope.hints.items())),
        )
        if text
    ]
    if scoped:
        write(f"scope      {' · '.join(scoped)}\n")
    lineage = env.lineage
    if lineage.parent_envelope_id:
        parent, root = lineage.parent_envelope_id, lineage.root_envelope_id
        write(f"lineage    parent {parent} · root {root} · depth {lineage.depth}\n")
    state = STATE_NAMES.get(lifecycle.state, "?")
    timing = f"started {when(start)}"
    if lifecycle.HasField("end_time"):
        timing += f" · took {_duration(lifecycle.end_time.ToNanoseconds() - start)}"
    else:
        timing += " · unfinished"
    write(f"state      {state} · {timing}\n")
    if env.flags:
        flags = ", ".join(FLAG_NAMES.get(flag, str(flag)) for flag in env.flags)
        write(f"flags      {flags}\n")

    write("\nlifecycle\n")
    steps = [
        (
            f"+{_duration(step.time.ToNanoseconds() - start)}" if index else when(step.time.ToNanoseconds()),
            STATE_NAMES.get(getattr(step, "from"), "?") + " → " + STATE_NAMES.get(step.to, "?"),
            step.actor,
            step.reason,
        )
        for index, step in enumerate(lifecycle.transitions)
    ]
    _table.render(steps, out, None, indent="  ")

    admission = next((g for g in env.grants if g.stage == STAGE_ADMISSION), None)
    backend = next((g for g in env.grants if g.stage == STAGE_BACKEND), None)
    columns = [("requested", env.requested if env.HasField("requested") else None)]
    if admission is not None:
        columns.append((f"admission ({OUTCOME_NAMES[admission.outcome]})", admission.resources))
    if backend is not None:
        columns.append((f"backend ({OUTCOME_NAMES[backend.outcome]})", backend.resources))
    dims = [
        field
        for _, field in sorted(DIMENSION_FIELDS.items())
        if any(_value(resources, field) for _, resources in columns)
    ]
    write("\nresources\n")
    if dims:
        _table.render(
            [(str(field), *(_value(resources, field) or "-" for _, resources in columns)) for field in dims],
            out,
            ("dimension", *(title for title, _ in columns)),
            indent="  ",
        )
    else:
        write("  none requested or granted\n")
    for stage, grant in (("admission", admission), ("backend", backend)):
        if grant is not None and grant.reason_code:
            write(f"  {stage} grant: {grant.reason_code} — {grant.reason}\n")

    decision = env.decision
    write("\ndecision\n")
    summary = OUTCOME_NAMES.get(decision.outcome, "?")
    if decision.deciding_policy:
        summary += f" by {decision.deciding_policy}"
    if decision.reason_code:
        summary += f" ({decision.reason_code})"
    if decision.message:
        summary += f": {decision.message}"
    mode = MODE_NAMES.get(decision.mode, str(decision.mode)) if decision.mode else "enforce"
    write(f"  {summary} · {mode}{' · FAIL-OPEN' if decision.fail_open else ''}\n")
    if decision.policies:
        _table.render(
            [
                (
                    verdict.policy,
                    OUTCOME_NAMES.get(verdict.outcome, "?"),
                    MODE_NAMES.get(verdict.mode, str(verdict.mode)) if verdict.mode else "enforce",
                    verdict.reason_code or "-",
                    f"{verdict.duration_us} µs",
                    "; ".join(
                        text
                        for text in (
                            verdict.message,
                            f"rules {','.join(verdict.rule_ids)}" if verdict.rule_ids else "",
                            f"error {verdict.error}" if verdict.error else "",
                            "fail-open" if verdict.fail_open else "",
                        )
                        if text
                    ),
                )
                for verdict in decision.policies
            ],
            out,
            ("policy", "verdict", "mode", "reason", "took", "detail"),
            indent="  ",
        )
    else:
        write("  no policy consulted\n")

    if env.HasField("binding"):
        binding = env.binding
        bound = [
            f"{label} {text}"
            for label, text in (
                ("node", binding.node),
                ("accelerators", ",".join(str(i) for i in binding.accelerator_indexes)),
                ("runtime", binding.runtime),
                ("endpoint", binding.endpoint),
                ("region", binding.region),
            )
            if text
        ]
        write(f"\nbinding    {' · '.join(bound)}\n")
    if env.HasField("outcome"):
        outcome = env.outcome
        status = _STATUS.get(outcome.status_code, str(outcome.status_code))
        text = f"{status}{' ' + outcome.reason_code if outcome.reason_code else ''}"
        if outcome.status_message:
            text += f": {outcome.status_message}"
        write(f"\noutcome    {text}\n")
        usage = " ".join(f"{field.name}={value}" for field, value in outcome.usage.ListFields())
        if usage:
            write(f"usage      {usage}\n")

    if tree is not None:
        write("\nlineage\n")
        _table.render(tree_rows(tree, env.envelope_id), out, None)


# -- stats ---------------------------------------------------------------------------------


def stats(result: LedgerStats, out: IO[str]) -> None:
    """The stats as three tables."""
    tenants = len(result.tenants)
    out.write(
        f"{result.envelopes} envelopes · {tenants} tenant{'s' if tenants != 1 else ''} · "
        f"{result.unfinished} unfinished · {result.dropped} dropped by writers\n"
    )
    out.write("\nrequested vs granted (granted: final grant; rejected envelopes get nothing)\n")
    if result.resources:
        _table.render(
            [
                (
                    r.tenant or "-",
                    r.dimension,
                    str(r.envelopes),
                    str(r.requested),
                    str(r.granted),
                    str(r.narrowed),
                    str(r.widened),
                )
                for r in result.resources
            ],
            out,
            ("tenant", "dimension", "envelopes", "requested", "granted", "narrowed", "widened"),
        )
    else:
        out.write("(no resources requested or granted)\n")
    out.write("\ndenials\n")
    if result.denials:
        _table.render(
            [(d.reason_code or "-", d.stage, str(d.count)) for d in result.denials],
            out,
            ("reason", "stage", "count"),
        )
    else:
        out.write("(none)\n")
    out.write("\nnarrowing\n")
    _table.render(
        [
            (
                t.tenant or "-",
                str(t.envelopes),
                str(t.denied),
                str(t.rejected),
                str(t.granted),
                str(t.narrowed),
                str(t.narrowed_at_admission),
                str(t.widened),
                f"{t.narrowing_rate:.1%}",
            )
            for t in result.tenants
        ],
        out,
        (
            "tenant",
            "envelopes",
            "denied",
            "rejected",
            "granted",
            "narrowed",
            "at admission",
            "widened",
            "narrowing rate",
        ),
    )
