"""Ledger write throughput and the latency of durable admission.

``python -m benchmarks.ledger`` (a few seconds; ``make bench`` runs it after
the gRPC bench) measures, for SQLite and then for PostgreSQL:

* **terminal records** — ``LedgerSink.write`` fed batches of 500 terminal
  envelopes from one thread, as the audit dispatcher does, until every record
  is committed: envelopes per second, the figure to hold against the target
  of 20,000/s for SQLite;
* **write-ahead** — 16 threads acting as RPCs: each envelope is recorded by a
  durable ``admitted()`` (waiting for its group commit) and then by its
  terminal record, so every envelope is written twice: envelopes per second
  and the admission latency (p50 / p99) that a call pays;
* **durable admission, alone** — one thread, one call at a time: the
  smallest latency a durable admission adds to a call.

Envelopes are built beforehand (three realistic shapes, fresh ids); their
serialization is part of what is measured, as it is on a server. PostgreSQL
runs when ENVELOPE_GRPC_BENCH_POSTGRES names a server (the bench works in a
schema of its own and drops it) or when the machine's PostgreSQL binaries can
start a temporary one (fsync on); otherwise it is reported as skipped. Every
run checks that the ledger holds every envelope, terminal, and exits 1 if not.
Results also go to build/bench-ledger.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks._report import nearest_rank
from envelope_grpc import _envelope as model
from envelope_grpc._values import OUTCOME_ADMITTED
from envelope_grpc.ledger import LedgerError, LedgerSink, open_ledger
from envelope_grpc.testing.postgres import PostgresUnavailable, TemporaryPostgres
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope, ExecutionKind, Resources

ROOT = Path(__file__).resolve().parent.parent
TARGET = 20_000  # envelopes per second into SQLite
THREADS = 16
BATCH = 500


@dataclasses.dataclass(frozen=True)
class Result:
    """One measured workload."""

    backend: str
    workload: str
    envelopes: int
    seconds: float
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None

    @property
    def per_second(self) -> float:
        return self.envelopes / self.seconds if self.seconds else 0.0


INFERENCE: Final = ExecutionKind.EXECUTION_KIND_INFERENCE
DEPLOYMENT: Final = ExecutionKind.EXECUTION_KIND_DEPLOYMENT


def _shape(tenant: str, subject: str, kind: int, method: str, asked: Resources, granted: Resources) -> Any:
    env = model.new_envelope(method)
    env.principal.subject = subject
    env.principal.tenant = tenant
    env.principal.roles.append("ml-engineer")
    env.execution.kind = kind  # type: ignore[assignment]
    env.execution.target.name = "llama-3-8b"
    env.execution.target.type = "model"
    env.trace_id = uuid.uuid4().hex
    env.span_id = uuid.uuid4().hex[:16]
    model.record_requested(env, asked)
    model.transition(env, model.NORMALIZED, actor="extractor")
    env.decision.outcome = model.compare(asked, granted)
    if env.decision.outcome != OUTCOME_ADMITTED:
        env.decision.reason_code = "LIMIT_NARROWED"
        env.decision.message = "capped"
    env.decision.policies.add(policy="limits", outcome=env.decision.outcome, duration_us=12)
    model.record_admission_grant(
        env, granted, reason_code=env.decision.reason_code, reason=env.decision.message
    )
    model.transition(env, model.ADMITTED, actor="admission")
    done = ExecutionEnvelope()
    done.CopyFrom(env)
    model.transition(done, model.COMPLETED, actor="completion")
    done.outcome.usage.duration_ms = 12
    return env, done


def envelopes(count: int) -> tuple[list[ExecutionEnvelope], list[ExecutionEnvelope]]:
    """``count`` admission records and their terminal records."""
    shapes = [
        _shape(
            "acme",
            "alice",
            INFERENCE,
            "/inference.GRPCInferenceService/ModelInfer",
            Resources(tokens=512, bytes=2048),
            Resources(tokens=512, bytes=2048),
        ),
        _shape(
            "globex",
            "bob",
            INFERENCE,
            "/inference.GRPCInferenceService/ModelInfer",
            Resources(tokens=20000, bytes=27),
            Resources(tokens=4096, bytes=27),
        ),
        _shape(
            "initech",
            "ci-runner",
            DEPLOYMENT,
            "/services.deployment.v1.DeploymentService/DeployModel",
            Resources(accelerator_count=2, replicas_max=2),
            Resources(accelerator_count=2, replicas_max=2),
        ),
    ]
    admitted: list[ExecutionEnvelope] = []
    terminal: list[ExecutionEnvelope] = []
    for index in range(count):
        first, last = shapes[index % len(shapes)]
        envelope_id = os.urandom(16).hex()
        for source, into in ((first, admitted), (last, terminal)):
            env = ExecutionEnvelope()
            env.CopyFrom(source)
            env.envelope_id = envelope_id
            into.append(env)
    return admitted, terminal


def _chunks(items: Sequence[ExecutionEnvelope], size: int) -> Iterator[Sequence[ExecutionEnvelope]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def terminal_records(url: str, backend: str, terminal: Sequence[ExecutionEnvelope]) -> Result:
    """The dispatcher's path: batches of terminal envelopes, from one thread."""
    sink = LedgerSink(url, durable_admission=False)
    try:
        started = time.perf_counter()
        for chunk in _chunks(terminal, BATCH):
            sink.write(chunk)
        if not sink.flush(120):
            raise LedgerError("the writer did not catch up within 120 s")
        return Result(
            backend, f"terminal records, batches of {BATCH}", len(terminal), time.perf_counter() - started
        )
    finally:
        sink.close()


def write_ahead(
    url: str,
    backend: str,
    admitted: Sequence[ExecutionEnvelope],
    terminal: Sequence[ExecutionEnvelope],
    threads: int,
) -> Result:
    """RPC threads: durable admission, then the terminal record."""
    sink = LedgerSink(url, durable_admission=True)
    latencies: list[list[int]] = [[] for _ in range(threads)]

    def call(worker: int) -> None:
        mine = latencies[worker]
        clock = time.perf_counter_ns
        for index in range(worker, len(admitted), threads):
            before = clock()
            sink.admitted(admitted[index])
            mine.append(clock() - before)
            sink.write((terminal[index],))

    try:
        started = time.perf_counter()
        workers = [threading.Thread(target=call, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if not sink.flush(120):
            raise LedgerError("the writer did not catch up within 120 s")
        seconds = time.perf_counter() - started
    finally:
        sink.close()
    every = sorted(ns for mine in latencies for ns in mine)
    p50, p99 = (nearest_rank(every, q) / 1e3 if every else 0.0 for q in (0.50, 0.99))
    label = f"write-ahead: durable admission + terminal, {threads} threads"
    return Result(backend, label, len(admitted), seconds, p50, p99)


def _check(url: str, expected: set[str]) -> list[str]:
    """Whether the ledger holds every envelope, terminal."""
    with open_ledger(url, create=False) as ledger:
        found = ledger.list()
    states = {env.envelope_id: env.lifecycle.state for env in found}
    problems = []
    missing = expected - states.keys()
    if missing:
        problems.append(f"{len(missing)} envelope(s) missing")
    unfinished = [key for key in expected & states.keys() if states[key] != model.COMPLETED]
    if unfinished:
        problems.append(f"{len(unfinished)} envelope(s) not terminal")
    return problems


def run_backend(
    backend: str, fresh_url: Callable[[], str], count: int, quick: bool
) -> tuple[list[Result], list[str]]:
    """Every workload on fresh ledgers; results and problems found."""
    admitted, terminal = envelopes(count)
    results: list[Result] = []
    problems: list[str] = []
    url = fresh_url()
    results.append(terminal_records(url, backend, terminal))
    problems += [f"{backend} terminal records: {p}" for p in _check(url, {e.envelope_id for e in terminal})]
    share = max(THREADS * 10, count // (8 if backend == "sqlite" else 4))
    url = fresh_url()
    results.append(write_ahead(url, backend, admitted[:share], terminal[:share], THREADS))
    problems += [
        f"{backend} write-ahead: {p}" for p in _check(url, {e.envelope_id for e in terminal[:share]})
    ]
    alone = 200 if quick else 1000
    url = fresh_url()
    result = write_ahead(url, backend, admitted[:alone], terminal[:alone], 1)
    results.append(dataclasses.replace(result, workload="durable admission alone, 1 thread"))
    problems += [
        f"{backend} durable admission: {p}" for p in _check(url, {e.envelope_id for e in terminal[:alone]})
    ]
    return results, problems


def _print(results: Sequence[Result]) -> None:
    header = (
        f"{'backend':<11}{'workload':<58}{'envelopes':>10}{'seconds':>9}"
        f"{'envelopes/s':>13}{'admit p50':>11}{'admit p99':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        p50 = f"{r.latency_p50_us:,.0f} µs" if r.latency_p50_us is not None else "-"
        p99 = f"{r.latency_p99_us:,.0f} µs" if r.latency_p99_us is not None else "-"
        print(
            f"{r.backend:<11}{r.workload:<58}{r.envelopes:>10,}{r.seconds:>9.2f}{r.per_second:>13,.0f}{p50:>11}{p99:>11}",
            flush=True,
        )


def _postgres_schema_url(url: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("options", f"-csearch_path={schema}"))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def postgres(count: int, quick: bool) -> tuple[list[Result], list[str], str]:
    """The PostgreSQL workloads: results, problems, and what was used (or why skipped)."""
    import psycopg

    given = os.environ.get("ENVELOPE_GRPC_BENCH_POSTGRES", "")
    server: TemporaryPostgres | None = None
    if given.startswith(("postgresql://", "postgres://")):
        base, where = given, "ENVELOPE_GRPC_BENCH_POSTGRES"
    else:
        try:
            server = TemporaryPostgres(fsync=True).start()
        except PostgresUnavailable as error:
            return [], [], f"skipped: {error} (set ENVELOPE_GRPC_BENCH_POSTGRES=postgresql://...)"
        base, where = server.create_database("ledger_bench"), "a temporary server (fsync on)"
    schemas: list[str] = []

    def fresh() -> str:
        schema = f"envelope_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        schemas.append(schema)
        return _postgres_schema_url(base, schema)

    try:
        results, problems = run_backend("postgresql", fresh, count, quick)
    finally:
        try:
            with psycopg.connect(base, autocommit=True) as conn:
                for schema in schemas:
                    conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            if server is not None:
                server.stop()
    return results, problems, where


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--envelopes", type=int, default=None, help="envelopes per SQLite run (default 80000)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: small runs")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench-ledger.json")
    args = parser.parse_args(argv)
    count = args.envelopes or (5_000 if args.quick else 80_000)
    started = time.perf_counter()
    workdir = Path(
        tempfile.mkdtemp(prefix="bench-ledger-", dir=ROOT / "build" if (ROOT / "build").is_dir() else None)
    )
    runs = iter(range(1_000))
    print(f"Ledger writes ({count:,} envelopes for SQLite; WAL, synchronous=NORMAL)\n", flush=True)
    try:
        results, problems = run_backend(
            "sqlite", lambda: f"sqlite:///{workdir / f'ledger-{next(runs)}.db'}", count, args.quick
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    pg_note = "skipped (--no-postgres)"
    if not args.no_postgres:
        pg_results, pg_problems, pg_note = postgres(max(count // 4, 1_000), args.quick)
        results += pg_results
        problems += pg_problems
    _print(results)
    headline = results[0].per_second
    verdict = "met" if headline >= TARGET else "NOT met"
    print(f"\nSQLite terminal records: {headline:,.0f} envelopes/s — target {TARGET:,}/s {verdict}")
    print(f"PostgreSQL: {pg_note}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "target_sqlite_envelopes_per_s": TARGET,
                "postgresql": pg_note,
                "results": [
                    {**dataclasses.asdict(r), "envelopes_per_s": round(r.per_second, 1)} for r in results
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"{len(results)} measurements in {time.perf_counter() - started:.0f}s; results in {args.json}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
