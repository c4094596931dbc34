"""Envelopes as a readable table: who, kind, target, requested vs granted,
decision and final state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Final

from envelope_grpc._telemetry import KIND_NAMES, OUTCOME_NAMES, STATE_NAMES
from envelope_grpc._values import OUTCOME_ADMITTED
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope, Resources

_GIB: Final = 1 << 30
_MIB: Final = 1 << 20
# Short labels for the quantities worth a column's space.
_LABELS: Final = (
    ("accelerator_count", "acc"),
    ("accelerator_type", ""),
    ("replicas_max", "replicas"),
    ("memory_bytes", "mem"),
    ("concurrency", "conc"),
    ("tokens", "tok"),
    ("bytes", "bytes"),
)
#: The columns; "decision" is admission's outcome, then the backend's grant
#: outcome when it differs ("admitted → narrowed").
HEADER: Final = (
    "envelope",
    "parent",
    "who",
    "tenant",
    "kind",
    "target",
    "requested",
    "granted",
    "decision",
    "state",
)


def _size(value: int) -> str:
    if value >= _GIB and value % _GIB == 0:
        return f"{value // _GIB}G"
    if value >= _MIB:
        return f"{value / _MIB:.1f}M".replace(".0M", "M")
    return str(value)


def amounts(resources: Resources | None) -> str:
    """A compact text of the main quantities, e.g. "acc=2 a100 mem=32G"."""
    if resources is None:
        return "-"
    parts: list[str] = []
    for field, label in _LABELS:
        if field == "accelerator_type":
            if resources.accelerator_type:
                parts.append(resources.accelerator_type)
        elif resources.HasField(field):  # type: ignore[arg-type]
            value = getattr(resources, field)
            parts.append(f"{label}={_size(value) if field.endswith('bytes') else value}")
    return " ".join(parts) or "-"


def row(env: ExecutionEnvelope) -> tuple[str, ...]:
    """One envelope as the table's cells."""
    decision = OUTCOME_NAMES[env.decision.outcome]
    if env.decision.reason_code:
        decision += f" ({env.decision.reason_code})"
    final = env.grants[-1] if len(env.grants) > 1 else None
    if final is not None and final.outcome != OUTCOME_ADMITTED:
        decision += f" → {OUTCOME_NAMES[final.outcome]}"
    state = STATE_NAMES[env.lifecycle.state]
    if env.outcome.reason_code and env.outcome.reason_code != env.decision.reason_code:
        state += f" ({env.outcome.reason_code})"
    granted = env.grants[-1] if env.grants else None
    return (
        env.envelope_id[:8],
        env.lineage.parent_envelope_id[:8] or "-",
        env.principal.subject or "anonymous",
        env.principal.tenant or "-",
        KIND_NAMES[env.execution.kind],
        target_label(env),
        amounts(env.requested) if env.HasField("requested") else "-",
        amounts(granted.resources) if granted is not None and granted.HasField("resources") else "-",
        decision,
        state,
    )


def target_label(env: ExecutionEnvelope, missing: str = "") -> str:
    """The target as "name:version"; the method's name when it has none,
    and ``missing`` when there is neither."""
    target = env.execution.target
    name = target.name or env.execution.method.rsplit("/", 1)[-1] or missing
    return f"{name}:{target.version}" if target.version else name


def visible(text: str) -> str:
    """``text`` with every character a terminal would act on (a line break,
    an escape sequence, a direction override) written as its escape: what
    callers put into an envelope cannot draw rows or hide text."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def render(
    rows: Sequence[Sequence[str]], out: IO[str], header: Sequence[str] | None = HEADER, *, indent: str = ""
) -> None:
    """Write ``rows`` as aligned columns (each cell made ``visible``), under
    ``header`` and a rule when there is one, each line starting with ``indent``."""
    table = [tuple(map(visible, r)) for r in ([header] if header is not None else []) + list(rows)]
    if not table:
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for index, cells in enumerate(table):
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        out.write(indent + line.rstrip() + "\n")
        if index == 0 and header is not None:
            out.write(indent + "  ".join("-" * width for width in widths) + "\n")


def envelopes(items: Sequence[ExecutionEnvelope], out: IO[str]) -> None:
    """Write ``items`` as the envelope table."""
    render([row(env) for env in items], out)
