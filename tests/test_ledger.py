"""The envelope ledger: one suite over SQLite and a real PostgreSQL server.

The PostgreSQL server is started by this module's own session fixture from
the machine's binaries (initdb as an unprivileged user when the tests run as
root), on a free port of 127.0.0.1; each test gets a fresh database. If no
server can be started the PostgreSQL tests fail, saying why: nothing is
skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from envelope_grpc import EnvelopeConfig, Limit, LimitsPolicy
from envelope_grpc import _envelope as model
from envelope_grpc._ledger_sql import _LOCK
from envelope_grpc._sinks import WriteAheadSink
from envelope_grpc.ledger import (
    DenialCount,
    DimensionTotals,
    Filters,
    Ledger,
    LedgerError,
    LedgerSinkStats,
    LedgerStats,
    TenantRates,
    open_ledger,
)
from envelope_grpc.testing.postgres import PostgresUnavailable, TemporaryPostgres
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc
from envelope_grpc.v1.envelope_pb2 import (
    ExecutionEnvelope,
    ExecutionKind,
    ResourceDimension,
    Resources,
)
from tests._envelopes import DEPLOY, DEPLOYMENT, T0, admitted, finished, ids, sample
from tests.conftest import Backend, wait_until

ROOT = Path(__file__).resolve().parent.parent
AGENT = ExecutionKind.EXECUTION_KIND_AGENT_WORKFLOW


# -- servers and ledgers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[TemporaryPostgres]:
    try:
        server = TemporaryPostgres(fsync=False).start()
    except PostgresUnavailable as error:
        pytest.fail(f"cannot start a PostgreSQL server for the ledger tests: {error}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    server: TemporaryPostgres = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    with open_ledger(url) as opened:
        yield opened


@contextlib.contextmanager
def writer_stalled(url: str) -> Iterator[None]:
    """Hold the ledger's write lock from another connection, so that a sink's
    writer waits inside its transaction."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
            try:
                yield
            finally:
                pg.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))


# -- writing -----------------------------------------------------------------------------------


def test_admission_record_is_durable_then_replaced_by_the_terminal_record(ledger: Ledger) -> None:
    sink = ledger.sink()
    assert isinstance(sink, WriteAheadSink)  # so that servers call admitted()
    try:
        env = admitted()
        sink.admitted(env)  # durable: committed when it returns, no flush needed
        (stored,) = ledger.list()
        assert stored == env
        assert stored.lifecycle.state == model.ADMITTED
        done = finished(env)
        sink.write([done])
        assert sink.flush()
        assert ledger.list() == [done]
        assert ledger.get(env.envelope_id) == done
        assert sink.stats() == LedgerSinkStats(
            received=2, written=2, dropped=0, failed=0, queued=0, batches=2
        )
    finally:
        sink.close()


def test_a_late_admission_record_never_overwrites_the_terminal_one(ledger: Ledger) -> None:
    first, second = admitted(at=0), admitted(at=1)
    granted = ExecutionEnvelope()
    granted.CopyFrom(first)
    model.record_grant(granted, Resources(tokens=10), now_ns=T0 + 5_000)
    sink = ledger.sink()
    try:
        sink.write([finished(first)])
        assert sink.flush()
        sink.admitted(first)  # arrives after the terminal record
        sink.admitted(granted)  # further along than admission, still not terminal
        assert sink.flush()
        # In one batch, in either order.
        ledger.write([finished(second), second])
        ledger.write([second])
        assert [env.lifecycle.state for env in ledger.list()] == [model.COMPLETED, model.COMPLETED]
        assert ledger.list() == [finished(first), finished(second)]
    finally:
        sink.close()
    # A record further along replaces one behind it, never the reverse.
    third = admitted(at=2)
    ledger.write([third])
    later = ExecutionEnvelope()
    later.CopyFrom(third)
    model.record_grant(later, Resources(tokens=10), now_ns=T0 + 2 * 10**9 + 5_000)
    ledger.write([later])
    ledger.write([third])
    assert ledger.get(third.envelope_id) == later


# -- queries -----------------------------------------------------------------------------------


def test_list_filters_each_column(ledger: Ledger) -> None:
    envelopes = sample()
    e1, e2, e3, e4, e5, e6 = envelopes
    ledger.write(envelopes)
    assert ids(ledger.list()) == ids(envelopes)  # oldest first
    cases: list[tuple[Filters, list[ExecutionEnvelope]]] = [
        (Filters(tenant="acme"), [e1, e2, e3]),
        (Filters(tenant="nobody"), []),
        (Filters(principal="bob"), [e3, e4, e5]),
        (Filters(kind="deployment"), [e3, e4]),
        (Filters(kind="EXECUTION_KIND_INFERENCE"), [e1, e2, e5, e6]),
        (Filters(kind=DEPLOYMENT), [e3, e4]),
        (Filters(decision="narrowed"), [e2]),
        (Filters(decision="denied"), [e4]),
        (Filters(state="rejected"), [e4, e5]),
        (Filters(state="admitted"), [e6]),
        (Filters(state="completed"), [e1, e2, e3]),
        (Filters(method=DEPLOY), [e3, e4]),
        (Filters(trace_id=e1.trace_id), [e1, e2]),
        (Filters(trace_id=e3.trace_id.upper()), [e3]),
        (Filters(since=(T0 + 20 * 10**9) / 1e9), [e3, e4, e5, e6]),
        (Filters(until=(T0 + 20 * 10**9) / 1e9), [e1, e2]),
        (Filters(since=(T0 + 10 * 10**9) / 1e9, until=(T0 + 40 * 10**9) / 1e9), [e2, e3, e4]),
        (Filters(limit=2), [e5, e6]),  # the most recent, still oldest first
        (Filters(tenant="globex", state="rejected"), [e4, e5]),
        (Filters(tenant="globex", principal="bob", limit=1), [e5]),
    ]
    for filters, expected in cases:
        assert ids(ledger.list(filters)) == ids(expected), filters
    assert ids(ledger.list(tenant="acme", kind="inference")) == ids([e1, e2])  # keywords
    import datetime

    since = datetime.datetime.fromtimestamp((T0 + 45 * 10**9) / 1e9, datetime.UTC)
    assert ids(ledger.list(since=since)) == ids([e6])
    for bad in (Filters(kind="teleport"), Filters(state="done"), Filters(decision=99), Filters(limit=0)):
        with pytest.raises(ValueError, match=r"unknown|at least"):
            ledger.list(bad)


def test_get_takes_an_id_or_a_unique_prefix(ledger: Ledger) -> None:
    a = admitted(envelope_id="ab" + "0" * 30)
    b = admitted(envelope_id="ab" + "1" * 30)
    ledger.write([a, b])
    assert ledger.get(a.envelope_id) == a
    assert ledger.get("AB1") == b
    assert ledger.get("ab0000") == a
    assert ledger.get("cd") is None
    assert ledger.get("f" * 32) is None
    with pytest.raises(LedgerError, match="ambiguous"):
        ledger.get("ab")
    for bad in ("", "xyz", "a" * 33):
        with pytest.raises(ValueError, match="not an envelope id"):
            ledger.get(bad)


def test_children_and_the_lineage_tree(ledger: Ledger) -> None:
    root = finished(admitted(kind=AGENT, at=0))
    first = finished(admitted(parent=root, at=1))
    second = finished(admitted(parent=root, at=2))
    grandchild = finished(admitted(parent=first, at=3))
    stranger = finished(admitted(at=4))
    orphan = admitted(at=5)  # its parent was never recorded, its root was
    orphan.lineage.parent_envelope_id = "e" * 32
    orphan.lineage.root_envelope_id = root.envelope_id
    orphan.lineage.depth = 2
    ledger.write([grandchild, second, root, stranger, first, orphan])
    assert ids(ledger.children(root.envelope_id)) == ids([first, second])
    assert ids(ledger.children(first.envelope_id)) == ids([grandchild])
    assert ledger.children(grandchild.envelope_id) == []
    for member in (root, first, grandchild):
        tree = ledger.lineage(member.envelope_id[:10])
        assert tree is not None
        assert [(depth, env.envelope_id) for depth, env in tree.walk()] == [
            (0, root.envelope_id),
            (1, first.envelope_id),
            (2, grandchild.envelope_id),
            (1, second.envelope_id),
            (1, orphan.envelope_id),
        ]
    alone = ledger.lineage(stranger.envelope_id)
    assert alone is not None
    assert (alone.envelope, alone.children) == (stranger, ())
    assert ledger.lineage("0" * 32) is None


def test_stats_are_exact(ledger: Ledger) -> None:
    ledger.write(sample())
    expected = LedgerStats(
        envelopes=6,
        unfinished=1,
        resources=(
            DimensionTotals("acme", "accelerator_count", 1, 2, 2, 0, 0),
            DimensionTotals("acme", "memory_bytes", 1, 0, 8 << 30, 0, 1),
            DimensionTotals("acme", "tokens", 2, 5100, 4196, 1, 0),
            DimensionTotals("acme", "bytes", 1, 10, 10, 0, 0),
            DimensionTotals("globex", "accelerator_count", 1, 32, 0, 0, 0),
            DimensionTotals("globex", "tokens", 2, 30, 20, 0, 0),
        ),
        denials=(DenialCount("LIMIT_EXCEEDED", "admission", 1), DenialCount("NO_CAPACITY", "backend", 1)),
        tenants=(
            TenantRates(
                "acme", 3, denied=0, rejected=0, granted=3, narrowed=1, narrowed_at_admission=1, widened=1
            ),
            TenantRates(
                "globex", 3, denied=1, rejected=1, granted=1, narrowed=0, narrowed_at_admission=0, widened=0
            ),
        ),
        dropped=0,
    )
    assert ledger.stats() == expected
    assert ledger.stats().tenants[0].narrowing_rate == pytest.approx(1 / 3)
    acme = ledger.stats(tenant="acme")
    assert (acme.envelopes, acme.resources, acme.denials) == (3, expected.resources[:4], ())
    assert ledger.stats(limit=1).envelopes == 1
    assert ledger.stats().as_dict()["tenants"][0]["narrowing_rate"] == pytest.approx(0.333333)


def test_follow_returns_new_and_changed_envelopes_after_a_cursor(ledger: Ledger) -> None:
    assert ledger.cursor() == 0
    assert ledger.follow(0) == ([], 0)
    first, second = admitted(at=0), admitted(tenant="globex", at=1)
    ledger.write([first])
    found, cursor = ledger.follow(0)
    assert (found, cursor) == ([first], ledger.cursor())
    ledger.write([finished(second), finished(first)])  # new, and changed
    found, after = ledger.follow(cursor)
    assert found == [finished(second), finished(first)]  # write order
    assert ledger.follow(after) == ([], after)
    assert ledger.follow(cursor, Filters(tenant="globex"))[0] == [finished(second)]
    ledger.write([first])  # refused by the guard: nothing changes, nothing to follow
    assert ledger.follow(after) == ([], after)
    assert ledger.recent(1) == ([finished(first)], after)
    assert ledger.recent(5, Filters(tenant="globex")) == ([finished(second)], after)
    # tail follows from now until stopped.
    seen: list[ExecutionEnvelope] = []
    stop = threading.Event()
    follower = threading.Thread(target=lambda: seen.extend(ledger.tail(interval=0.02, stop=stop)))
    follower.start()
    try:
        time.sleep(0.1)
        third = admitted(at=2)
        ledger.write([third])
        wait_until(lambda: len(seen) == 1, timeout=10.0)
    finally:
        stop.set()
        follower.join(5)
    assert seen == [third]


# -- when the writer falls behind ------------------------------------------------------------


def test_drop_policy_counts_every_drop(url: str, ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    envelopes = [finished(admitted(at=n)) for n in range(21)]
    sink = ledger.sink(when_full="drop", max_queue=5, durable_admission=False)
    try:
        with caplog.at_level(logging.WARNING, "envelope_grpc.ledger"), writer_stalled(url):
            sink.write(envelopes[:1])
            wait_until(
                lambda: sink.stats().queued == 0, timeout=10.0
            )  # the writer holds it, waiting for the lock
            sink.write(envelopes[1:])
            assert sink.stats() == LedgerSinkStats(
                received=21, written=0, dropped=15, failed=0, queued=5, batches=0
            )
        assert sink.flush()
        assert sink.stats() == LedgerSinkStats(
            received=21, written=6, dropped=15, failed=0, queued=0, batches=2
        )
        assert ids(ledger.list()) == ids(envelopes[:6])
        assert ledger.dropped() == 15  # recorded in the ledger itself, with the next batch
        assert ledger.stats().dropped == 15
        assert any("15 record(s) dropped" in record.getMessage() for record in caplog.records)
    finally:
        sink.close()


def test_block_policy_makes_callers_wait_for_room(url: str, ledger: Ledger) -> None:
    envelopes = [finished(admitted(at=n)) for n in range(11)]
    sink = ledger.sink(when_full="block", max_queue=5, durable_admission=False)
    durable = ledger.sink(admission_timeout=0.3)
    late = admitted(at=20)
    try:
        with writer_stalled(url):
            sink.write(envelopes[:1])
            wait_until(lambda: sink.stats().queued == 0, timeout=10.0)
            caller = threading.Thread(target=sink.write, args=(envelopes[1:],))
            caller.start()
            wait_until(lambda: sink.stats().queued == 5, timeout=10.0)
            time.sleep(0.2)
            assert caller.is_alive()  # blocked: no room, nothing dropped
            assert sink.stats().dropped == 0
            # A durable admission waits for its commit, up to its timeout.
            with pytest.raises(LedgerError, match=r"not committed within 0\.3 s"):
                durable.admitted(late)
        caller.join(10)
        assert not caller.is_alive()
        assert sink.flush()
        assert durable.flush()
        assert sink.stats() == LedgerSinkStats(
            received=11, written=11, dropped=0, failed=0, queued=0, batches=3
        )
        assert set(ids(ledger.list())) == set(ids([*envelopes, late]))
    finally:
        sink.close()
        durable.close()


def test_a_closed_sink_still_records_what_arrives_late(ledger: Ledger) -> None:
    sink = ledger.sink()
    env = admitted()
    sink.close()
    sink.close()  # several servers share a sink: each closes it
    sink.admitted(env)
    sink.write([finished(env)])
    assert ledger.list() == [finished(env)]
    assert sink.stats().written == 2


def test_bad_urls_and_missing_ledgers_are_one_line_errors(tmp_path: Path) -> None:
    for url, message in (
        ("mysql://x@y/z", "unsupported ledger URL"),
        ("sqlite://relative.db", "bad SQLite ledger URL"),
        ("sqlite:///x.db?mode=ro", "bad SQLite ledger URL"),
        (f"sqlite:///{tmp_path}/missing/dir/x.db", "cannot open"),
        ("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2", "cannot connect to"),
    ):
        with pytest.raises(LedgerError, match=message) as raised:
            open_ledger(url)
        assert "\n" not in str(raised.value)
    with pytest.raises(LedgerError, match="no ledger at"):
        open_ledger(f"sqlite:///{tmp_path}/absent.db", create=False)
    (tmp_path / "other.db").write_bytes(b"")
    with pytest.raises(LedgerError, match="holds no envelope ledger"):
        open_ledger(f"sqlite:///{tmp_path}/other.db", create=False)


def test_the_url_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "from-env.db"
    monkeypatch.setenv("ENVELOPE_GRPC_LEDGER", f"sqlite:///{path}")
    with open_ledger() as ledger:
        ledger.write([admitted()])
        assert ledger.url == f"sqlite:///{path}"
    assert path.exists()


# -- through real servers --------------------------------------------------------------------


def test_servers_record_every_allowed_and_denied_call(
    backend: Callable[..., Backend], ledger: Ledger
) -> None:
    sink = ledger.sink()
    limits = LimitsPolicy([Limit(ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT, 8, deny=True)])
    server = backend(EnvelopeConfig(policies=[limits], sinks=[sink]))
    stub = server.stub
    stub.Run(pb.RunRequest(model="m", max_tokens=10))
    stub.Run(pb.RunRequest(model="m", accelerators=pb.Accelerators(count=2), behavior="grant"))
    stub.Run(pb.RunRequest(model="m", accelerators=pb.Accelerators(count=2), behavior="bind"))
    assert len(list(stub.Watch(pb.WatchRequest(run=pb.RunRequest(model="m", count=3))))) == 3
    refused = []
    for request in (
        pb.RunRequest(model="m", accelerators=pb.Accelerators(count=16)),  # denied at admission
        pb.RunRequest(model="m", behavior="reject"),  # refused by the backend
        pb.RunRequest(model="m", behavior="fail"),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Run(request)
        refused.append(raised.value.code())
    assert grpc.StatusCode.OK not in refused
    reported = server.envelopes(7)
    assert sink.flush()
    stored = {env.envelope_id: env for env in ledger.list()}
    assert stored == {env.envelope_id: env for env in reported}
    states = sorted(model.S.Name(env.lifecycle.state) for env in stored.values())
    assert (
        states
        == ["LIFECYCLE_STATE_COMPLETED"] * 4 + ["LIFECYCLE_STATE_FAILED"] + ["LIFECYCLE_STATE_REJECTED"] * 2
    )
    (denial,) = ledger.list(decision="denied")
    assert denial.decision.reason_code == "LIMIT_EXCEEDED"
    assert sink.stats().failed == sink.stats().dropped == 0
    assert sink.stats().received == 7 + 6  # six were admitted, and recorded twice


# -- SIGKILL mid-load ------------------------------------------------------------------------

_SERVER = textwrap.dedent(
    """
    import os, sys, threading, time
    from concurrent import futures
    import grpc
    import envelope_grpc
    from envelope_grpc import EnvelopeConfig
    from envelope_grpc.ledger import LedgerSink
    from envelope_grpc.testing.v1 import testing_pb2 as pb, testing_pb2_grpc as pb_grpc

    url, seen_path, port_path = sys.argv[1:4]
    seen = os.open(seen_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = threading.Lock()

    class Servicer(pb_grpc.ExecutionTestServiceServicer):
        def Run(self, request, context):
            env = envelope_grpc.current_envelope()
            with lock:  # what the handler saw is on disk before it goes on
                os.write(seen, (env.envelope_id + "\\n").encode())
                os.fsync(seen)
            time.sleep(0.2)
            return pb.RunResponse(envelope_id=env.envelope_id)

    config = EnvelopeConfig(sinks=[LedgerSink(url)])
    server = grpc.server(
        futures.ThreadPoolExecutor(16), interceptors=[envelope_grpc.EnvelopeServerInterceptor(config)]
    )
    pb_grpc.add_ExecutionTestServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_path + ".tmp", "w") as out:
        out.write(str(port))
    os.rename(port_path + ".tmp", port_path)
    server.wait_for_termination()
    """
)


def test_sigkill_mid_load_loses_no_admitted_envelope(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    seen, port_file, script = tmp_path / "seen.txt", tmp_path / "port", tmp_path / "server.py"
    script.write_text(_SERVER)
    process = subprocess.Popen(
        [sys.executable, str(script), url, str(seen), str(port_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stop = threading.Event()
    answered: list[str] = []

    def load() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
            stub = pb_grpc.ExecutionTestServiceStub(channel)
            while not stop.is_set():
                try:
                    answered.append(stub.Run(pb.RunRequest(model="m", max_tokens=5), timeout=5).envelope_id)
                except grpc.RpcError:
                    return  # the server is gone

    clients: list[threading.Thread] = []
    try:
        wait_until(lambda: port_file.exists() or process.poll() is not None, timeout=30)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        clients = [threading.Thread(target=load) for _ in range(12)]
        for client in clients:
            client.start()
        wait_until(lambda: seen.exists() and len(seen.read_text().split()) >= 40, timeout=20)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        stop.set()
        for client in clients:
            client.join(10)
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    handled = seen.read_text().split()
    path = str(tmp_path / "ledger.db")
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with open_ledger(url, create=False) as ledger:
        stored = {env.envelope_id: env.lifecycle.state for env in ledger.list()}
    missing = [envelope_id for envelope_id in handled if envelope_id not in stored]
    assert missing == [], f"{len(missing)} of {len(handled)} envelopes seen by handlers are not in the ledger"
    assert {stored[envelope_id] for envelope_id in handled} <= {model.ADMITTED, *model.TERMINAL}
    unfinished = [envelope_id for envelope_id in handled if stored[envelope_id] == model.ADMITTED]
    assert unfinished, "the kill should have caught calls in their handlers"
    assert set(answered) <= set(handled)
