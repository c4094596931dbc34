"""Aggregating rounds, printing tables and summaries, writing JSON.

Each configuration is measured in several short rounds, interleaved with the
other configurations; CPU per call and throughput are the median over rounds
(robust to a round disturbed by the machine), latency percentiles are taken
over every call of every round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._client import CONCURRENT, SEQUENTIAL, Run, Workload
from benchmarks._service import CONFIGS, ENVELOPED, LABELS


def nearest_rank(ordered: Sequence[int], quantile: float) -> int:
    """The ``quantile`` of ``ordered`` (sorted, not empty) by the nearest-rank method."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))]


Key = tuple[str, str, str, str]  # flavour, workload key, mode, config


@dataclasses.dataclass
class Result:
    """One configuration on one (flavour, workload, mode), over all rounds."""

    flavour: str
    workload: Workload
    mode: str
    config: str
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    latencies_ns: list[int] = dataclasses.field(default_factory=list)

    def add(self, run: Run, server: dict[str, Any]) -> None:
        """Add one measured round: what the client saw and what the server spent."""
        self.latencies_ns.extend(run.latencies_ns)
        self.rounds.append(
            {
                "calls": run.calls,
                "wall_s": run.wall_s,
                "cpu_us_per_call": _per(server["cpu_s"] * 1e6, run.calls),
                "calls_per_s": _per(run.calls, run.wall_s),
                **server,
            }
        )

    def _median(self, name: str) -> float:
        values = [r[name] for r in self.rounds if math.isfinite(r[name])]
        return statistics.median(values) if values else math.nan

    @property
    def calls(self) -> int:
        return sum(r["calls"] for r in self.rounds)

    @property
    def cpu_us_per_call(self) -> float:
        return self._median("cpu_us_per_call")

    @property
    def cpu_spread(self) -> float:
        """(max - min) / median of the rounds' CPU per call: how noisy the number is."""
        values = [r["cpu_us_per_call"] for r in self.rounds]
        return (max(values) - min(values)) / self.cpu_us_per_call if len(values) > 1 else math.nan

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_us_per_call / self.workload.messages if self.workload.messages else math.nan

    @property
    def calls_per_s(self) -> float:
        return self._median("calls_per_s")

    def latency_us(self, quantile: float) -> float:
        """Client-observed latency of whole calls at ``quantile`` (nearest rank), in µs."""
        if not self.latencies_ns:
            return math.nan
        return nearest_rank(sorted(self.latencies_ns), quantile) / 1e3

    def problems(self) -> list[str]:
        """Whether the configuration did what it claims: one span per call, with
        envelope attributes for the enveloped configurations; none for bare."""
        spans = sum(r["spans"] for r in self.rounds)
        enveloped = sum(r["enveloped_spans"] for r in self.rounds)
        want_spans = 0 if self.config == "bare" else self.calls
        want_enveloped = self.calls if self.config in ENVELOPED else 0
        found = []
        if spans != want_spans:
            found.append(f"{spans} spans exported for {self.calls} calls")
        if enveloped != want_enveloped:
            found.append(f"{enveloped} spans with envelope attributes for {self.calls} calls")
        return found

    def as_json(self, marginal: float) -> dict[str, Any]:
        return {
            "flavour": self.flavour,
            "workload": self.workload.key,
            "method": self.workload.method,
            "messages_per_call": self.workload.messages,
            "mode": self.mode,
            "config": self.config,
            "calls": self.calls,
            "server_cpu_us_per_call": _finite(self.cpu_us_per_call),
            "server_cpu_spread": _finite(self.cpu_spread),
            "server_cpu_us_per_message": _finite(self.cpu_us_per_message),
            "server_cpu_us_per_extra_message": _finite(marginal),
            "calls_per_s": _finite(self.calls_per_s),
            "latency_p50_us": _finite(self.latency_us(0.50)),
            "latency_p99_us": _finite(self.latency_us(0.99)),
            "rounds": self.rounds,
        }


def marginal(found: dict[Key, Result], result: Result) -> float:
    """Server CPU of one more stream message: (CPU per N-message call - CPU per
    one-message call) / (N - 1), same flavour, mode and configuration."""
    key = (result.flavour, result.workload.single, result.mode, result.config)
    single = found.get(key) if result.workload.single else None
    if single is None or result.workload.messages < 2:
        return math.nan
    return (result.cpu_us_per_call - single.cpu_us_per_call) / (result.workload.messages - 1)


def _per(amount: float, count: float) -> float:
    return amount / count if count else math.nan


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(value: float, base: float) -> float:
    return value / base if base and math.isfinite(base) and math.isfinite(value) else math.nan


def _num(value: float, digits: int = 1) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.{digits}f}"


def _pct(ratio: float) -> str:
    return "n/a" if not math.isfinite(ratio) else f"{(ratio - 1) * 100:+.1f}%"


# -- tables -----------------------------------------------------------------------------

_HEADER = (
    f"  {'configuration':<16}{'calls':>7}{'CPU µs/call':>13}{'±':>5}{'µs/msg':>9}{'µs/+msg':>9}"
    f"{'calls/s':>9}{'p50 µs':>9}{'p99 µs':>9} │{'CPU/call':>9}{'calls/s':>8}{'µs/+msg':>8}"
)


def table(found: dict[Key, Result], results: dict[str, Result], concurrency: int) -> list[str]:
    """The lines of one (flavour, workload, mode) table."""
    first = next(iter(results.values()))
    who = "1 client, calls back to back" if first.mode == SEQUENTIAL else f"{concurrency} calls in flight"
    lines = [f"{first.flavour} · {first.workload.label} · {first.mode} ({who})", _HEADER + "  ← ÷ OTel"]
    otel = results["otel"]
    otel_marginal = marginal(found, otel)
    for config in CONFIGS:
        result = results[config]
        extra = marginal(found, result)
        spread = result.cpu_spread
        lines.append(
            f"  {LABELS[config]:<16}{result.calls:>7}{_num(result.cpu_us_per_call):>13}"
            f"{'-' if not math.isfinite(spread) else f'{spread * 50:.0f}%':>5}"
            f"{_num(result.cpu_us_per_message):>9}{_num(extra):>9}"
            f"{_num(result.calls_per_s, 0):>9}{_num(result.latency_us(0.5), 0):>9}"
            f"{_num(result.latency_us(0.99), 0):>9} │"
            f"{_num(_ratio(result.cpu_us_per_call, otel.cpu_us_per_call), 3):>9}"
            f"{_num(_ratio(result.calls_per_s, otel.calls_per_s), 3):>8}"
            f"{_num(_ratio(extra, otel_marginal), 3):>8}"
        )
    for config in CONFIGS:
        for problem in results[config].problems():
            lines.append(f"  ! {LABELS[config]}: {problem}")
    return lines


LEGEND = (
    "Columns: server CPU µs per call (median of rounds; ± half the rounds' range), per stream message\n"
    "(amortized: CPU per call / messages) and per additional message (µs/+msg: N-message minus one-message\n"
    "stream, / (N-1)); client throughput (median of rounds) and whole-call latency percentiles; then the\n"
    "ratios against OTel alone.\n"
)


# -- summary ------------------------------------------------------------------------------


def summary(flavour: str, found: dict[Key, Result]) -> tuple[list[str], dict[str, Any]]:
    """The per-flavour summary line (and details), and the same as JSON."""

    def get(workload: str, mode: str, config: str) -> Result | None:
        return found.get((flavour, workload, mode, config))

    def cpu(workload: str, mode: str, config: str) -> float:
        result = get(workload, mode, config)
        return result.cpu_us_per_call if result else math.nan

    def rate(workload: str, mode: str, config: str) -> float:
        result = get(workload, mode, config)
        return result.calls_per_s if result else math.nan

    unary_cpu = {c: cpu("unary", SEQUENTIAL, c) for c in CONFIGS}
    unary_cpu_conc = {c: cpu("unary", CONCURRENT, c) for c in CONFIGS}
    throughput = {c: rate("unary", CONCURRENT, c) for c in CONFIGS}
    extra: dict[str, dict[str, float]] = {}  # "watch/sequential" -> config -> µs per additional message
    for workload in ("watch", "upload"):
        for mode in (SEQUENTIAL, CONCURRENT):
            results = {c: get(workload, mode, c) for c in CONFIGS}
            extra[f"{workload}/{mode}"] = {
                c: marginal(found, r) if r else math.nan for c, r in results.items()
            }
    per_message = {c: sum(values[c] for values in extra.values()) for c in CONFIGS}

    def overhead(config: str) -> tuple[float, float, float]:
        """CPU per unary call, concurrent throughput and CPU per stream message, ÷ OTel's."""
        return (
            _ratio(unary_cpu[config], unary_cpu["otel"]),
            _ratio(throughput[config], throughput["otel"]),
            _ratio(per_message[config], per_message["otel"]),
        )

    def listed(values: dict[str, float], digits: int = 1) -> str:
        return ", ".join(f"{LABELS[c].removeprefix('OTel + ')} {_num(values[c], digits)}" for c in CONFIGS)

    lines = []
    for config, what in (("envelope", "envelope overhead"), ("floor", "floor overhead")):
        cpu_ratio, throughput_ratio, message_ratio = overhead(config)
        share = "n/a" if not math.isfinite(throughput_ratio) else f"{throughput_ratio * 100:.1f}%"
        lines.append(
            f"{flavour}: {what}: {_pct(cpu_ratio)} server CPU per unary call, "
            f"{share} of OTel throughput (concurrent), {_pct(message_ratio)} per stream message"
        )
    added = {
        c: unary_cpu[c] - unary_cpu[base]
        for c, base in (("envelope", "otel"), ("floor", "otel"), ("otel", "bare"))
    }
    lines += [
        f"    unary server CPU µs/call, sequential: {listed(unary_cpu)} "
        f"(envelope +{_num(added['envelope'])} µs, floor +{_num(added['floor'])} µs, "
        f"OTel +{_num(added['otel'])} µs over bare)",
        f"    unary server CPU µs/call, concurrent: {listed(unary_cpu_conc)} "
        f"(envelope {_pct(_ratio(unary_cpu_conc['envelope'], unary_cpu_conc['otel']))})",
        f"    unary calls/s, concurrent: {listed(throughput, 0)}",
        "    µs per additional stream message, OTel → floor → envelope: "
        + "; ".join(
            f"{name} {' → '.join(_num(values[c]) for c in ('otel', 'floor', 'envelope'))}"
            for name, values in extra.items()
        ),
    ]
    cpu_ratio, throughput_ratio, message_ratio = overhead("envelope")
    floor_cpu, floor_throughput, floor_message = overhead("floor")
    data = {
        "flavour": flavour,
        "unary_cpu_overhead_pct": _finite((cpu_ratio - 1) * 100),
        "unary_concurrent_throughput_pct_of_otel": _finite(throughput_ratio * 100),
        "stream_message_cpu_overhead_pct": _finite((message_ratio - 1) * 100),
        "floor_unary_cpu_overhead_pct": _finite((floor_cpu - 1) * 100),
        "floor_unary_concurrent_throughput_pct_of_otel": _finite(floor_throughput * 100),
        "floor_stream_message_cpu_overhead_pct": _finite((floor_message - 1) * 100),
        "unary_sequential_cpu_us_per_call": {c: _finite(v) for c, v in unary_cpu.items()},
        "unary_concurrent_cpu_us_per_call": {c: _finite(v) for c, v in unary_cpu_conc.items()},
        "unary_concurrent_calls_per_s": {c: _finite(v) for c, v in throughput.items()},
        "cpu_us_per_additional_stream_message": {
            name: {c: _finite(v) for c, v in values.items()} for name, values in extra.items()
        },
    }
    return lines, data


def write_json(
    path: Path, meta: dict[str, Any], found: dict[Key, Result], summaries: Sequence[dict[str, Any]]
) -> None:
    """Everything measured, for comparing runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "summaries": list(summaries),
        "results": [result.as_json(marginal(found, result)) for result in found.values()],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
