"""Audit sinks, their loss accounting, metrics, and the public surface."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import envelope_grpc
import envelope_grpc.aio
import envelope_grpc.ledger
from envelope_grpc import (
    EnvelopeConfig,
    JsonLinesSink,
    Limit,
    LimitsPolicy,
    SinkDispatcher,
    from_json,
    new_envelope,
)
from envelope_grpc._telemetry import Metrics
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.v1.envelope_pb2 import (
    DecisionOutcome,
    ExecutionEnvelope,
    ExecutionKind,
    ResourceDimension,
    Resources,
)
from tests.conftest import Backend


def test_json_lines_sink_writes_one_envelope_per_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "audit.jsonl"
    dispatcher = SinkDispatcher([JsonLinesSink(str(path))])
    envelopes = [new_envelope("/a.B/C") for _ in range(3)]
    for env in envelopes:
        dispatcher.submit(env)
    dispatcher.close()
    lines = path.read_text().splitlines()
    assert [from_json(line) for line in lines] == envelopes
    assert all(json.loads(line)["schemaVersion"] == "1.0" for line in lines)
    assert dispatcher.stats() == envelope_grpc.SinkStats(
        submitted=3, written=3, dropped=0, failed=0, queued=0
    )


class Failing:
    def write(self, envelopes: Any, /) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        pass


class Blocking:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.written = 0

    def write(self, envelopes: Any, /) -> None:
        self.release.wait(5)
        self.written += len(envelopes)

    def close(self) -> None:
        pass


def test_close_keeps_its_timeout_behind_a_stuck_sink_and_later_envelopes_count_as_dropped() -> None:
    class Stuck(Blocking):
        closed = False
        entered = threading.Event()

        def write(self, envelopes: Any, /) -> None:
            self.entered.set()
            super().write(envelopes)

        def close(self) -> None:
            self.closed = True

    stuck = Stuck()
    dispatcher = SinkDispatcher([stuck], max_queue=2)
    dispatcher.submit(new_envelope("/a.B/C"))
    assert stuck.entered.wait(5)  # the writer is stuck on the first
    for _ in range(4):  # two queued, two dropped
        dispatcher.submit(new_envelope("/a.B/C"))
    closing = threading.Thread(target=dispatcher.close, kwargs={"timeout": 0.2})
    closing.start()
    closing.join(3)
    assert not closing.is_alive()
    assert not stuck.closed  # not closed under its writer
    dispatcher.submit(new_envelope("/a.B/C"))
    stats = envelope_grpc.SinkStats(submitted=6, written=0, dropped=3, failed=0, queued=2)
    assert dispatcher.stats() == stats
    stuck.release.set()


def test_failing_sink_is_counted_not_raised() -> None:
    dispatcher = SinkDispatcher([Failing()])
    dispatcher.submit(new_envelope("/a.B/C"))
    assert dispatcher.flush()
    assert dispatcher.stats().failed == 1
    assert dispatcher.stats().written == 0
    dispatcher.close()


def test_an_envelope_is_built_on_the_dispatchers_thread_and_a_failed_build_is_counted() -> None:
    collected: list[tuple[str, str]] = []

    class Collect:
        def write(self, envelopes: Any, /) -> None:
            collected.extend((env.envelope_id, threading.current_thread().name) for env in envelopes)

        def close(self) -> None:
            pass

    built: list[str] = []

    def build() -> ExecutionEnvelope:
        built.append(threading.current_thread().name)
        return new_envelope("/a.B/C", envelope_id="b" * 32)

    def broken() -> ExecutionEnvelope:
        raise RuntimeError("cannot build")

    dispatcher = SinkDispatcher([Collect()])
    dispatcher.submit(build)
    dispatcher.submit(broken)
    dispatcher.submit(new_envelope("/a.B/C", envelope_id="c" * 32))
    assert dispatcher.flush()
    stats = dispatcher.stats()
    dispatcher.close()
    assert built == ["envelope-grpc-sinks"]
    assert collected == [("b" * 32, "envelope-grpc-sinks"), ("c" * 32, "envelope-grpc-sinks")]
    assert (stats.submitted, stats.written, stats.failed) == (3, 2, 1)


def test_full_queue_drops_are_counted_and_submit_never_blocks() -> None:
    sink = Blocking()
    dispatcher = SinkDispatcher([sink], max_queue=2, max_batch=1)
    for _ in range(10):
        dispatcher.submit(new_envelope("/a.B/C"))
    stats = dispatcher.stats()
    sink.release.set()
    dispatcher.close()
    assert stats.submitted == 10
    assert 7 <= stats.dropped <= 8  # one may be in the sink's hands, two queued
    assert sink.written + stats.dropped == 10


def test_sink_errors_never_fail_the_call(backend: Any) -> None:
    server: Backend = backend(EnvelopeConfig(sinks=[Failing()]))
    reply = server.stub.Run(pb.RunRequest(model="m"))
    (env,) = server.envelopes(1)
    assert reply.envelope_id == env.envelope_id
    assert server.interceptor.core.dispatcher.flush()
    stats = server.interceptor.sink_stats()
    assert stats is not None
    assert stats.failed == 1


def test_flush_waits_until_every_envelope_reported_was_written(backend: Any) -> None:
    blocking = Blocking()
    server: Backend = backend(EnvelopeConfig(sinks=[blocking]))
    for _ in range(3):
        server.stub.Run(pb.RunRequest(model="m"))
    assert server.interceptor.flush(timeout=0.05) is False  # the sink is still held
    blocking.release.set()
    assert server.interceptor.flush(timeout=5) is True
    assert blocking.written == 3


def test_admission_metrics(backend: Any) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    limits = LimitsPolicy([Limit(ResourceDimension.RESOURCE_DIMENSION_TOKENS, 100)])
    server: Backend = backend(EnvelopeConfig(policies=[limits], meter_provider=provider))
    server.stub.Run(pb.RunRequest(model="m", tenant="acme", max_tokens=500))
    server.stub.Run(pb.RunRequest(model="m", tenant="acme", max_tokens=50))
    server.envelopes(2)

    def value(name: str, **attributes: str) -> Any:
        return _points(reader, name)[_labels("acme", **attributes)]

    assert value("execution_envelope.admissions", outcome="narrowed") == 1
    assert value("execution_envelope.admissions", outcome="admitted") == 1
    assert value("execution_envelope.resources.requested", dimension="tokens") == 550
    assert value("execution_envelope.resources.granted", dimension="tokens") == 150
    provider.shutdown()


def test_interceptors_that_share_a_meter_provider_add_to_the_same_counts(backend: Any) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first: Backend = backend(EnvelopeConfig(meter_provider=provider))
    second: Backend = backend(EnvelopeConfig(meter_provider=provider))
    first.stub.Run(pb.RunRequest(model="m", tenant="acme", max_tokens=5))
    for _ in range(3):
        second.stub.Run(pb.RunRequest(model="m", tenant="acme", max_tokens=10))
    first.envelopes(1)
    second.envelopes(3)
    assert _points(reader, "execution_envelope.admissions") == {_labels("acme", outcome="admitted"): 4}
    assert _points(reader, "execution_envelope.resources.requested") == {
        _labels("acme", dimension="tokens"): 35
    }
    provider.shutdown()


_GLOBAL_PROVIDER_SET_LATE = """
import json
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from envelope_grpc._telemetry import Metrics
from envelope_grpc.v1.envelope_pb2 import DecisionOutcome, ExecutionKind, Resources

ADMITTED = DecisionOutcome.DECISION_OUTCOME_ADMITTED
early = Metrics()  # an interceptor made before telemetry is set up
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
late = Metrics()
early.record(ExecutionKind.EXECUTION_KIND_INFERENCE, "acme", ADMITTED, Resources(tokens=5), None)
late.record(ExecutionKind.EXECUTION_KIND_INFERENCE, "globex", ADMITTED, Resources(tokens=7), None)
print(json.dumps({
    point.attributes["execution_envelope.tenant"]: point.value
    for resource in reader.get_metrics_data().resource_metrics
    for scope in resource.scope_metrics
    for metric in scope.metrics
    if metric.name == "execution_envelope.admissions"
    for point in metric.data.data_points
}))
"""


def test_interceptors_on_the_global_provider_count_together_before_and_after_it_is_set() -> None:
    # In a process of its own: the global meter provider can be set only once.
    command = [sys.executable, "-c", _GLOBAL_PROVIDER_SET_LATE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == {"acme": 1, "globex": 1}


def _labels(tenant: str, **extra: str) -> tuple[tuple[str, Any], ...]:
    found = {"kind": "inference", "tenant": tenant, **extra}
    return tuple(sorted((f"execution_envelope.{key}", value) for key, value in found.items()))


def _points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        tuple(sorted(point.attributes.items())): point.value
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    }


def test_admission_metrics_sum_in_process_and_overflow_past_the_series_limit() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counts = Metrics(provider, max_series=2)
    for tenant in ("acme", "acme", "globex", "initech", "umbrella"):
        counts.record(  # nothing granted
            ExecutionKind.EXECUTION_KIND_INFERENCE,
            tenant,
            DecisionOutcome.DECISION_OUTCOME_ADMITTED,
            Resources(tokens=10),
            None,
        )

    overflow = (("otel.metric.overflow", True),)
    assert _points(reader, "execution_envelope.admissions") == {
        _labels("acme", outcome="admitted"): 2,
        _labels("globex", outcome="admitted"): 1,
        overflow: 2,
    }
    assert _points(reader, "execution_envelope.resources.requested") == {
        _labels("acme", dimension="tokens"): 20,
        _labels("globex", dimension="tokens"): 10,
        overflow: 20,
    }
    assert _points(reader, "execution_envelope.resources.granted") == {}
    provider.shutdown()


@pytest.mark.parametrize("module", [envelope_grpc, envelope_grpc.aio, envelope_grpc.ledger])
def test_public_surface_is_sorted_and_importable(module: Any) -> None:
    assert module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_current_envelope_is_none_outside_a_call() -> None:
    assert envelope_grpc.current_envelope() is None
    with pytest.raises(RuntimeError, match="not inside a call"):
        envelope_grpc.record_usage(ExecutionEnvelope().outcome.usage)


class Ahead:
    """A write-ahead sink that keeps what it saw at admission and at the end."""

    def __init__(self) -> None:
        self.at_admission: list[ExecutionEnvelope] = []
        self.at_end: list[ExecutionEnvelope] = []

    def admitted(self, envelope: ExecutionEnvelope, /) -> None:
        snapshot = ExecutionEnvelope()
        snapshot.CopyFrom(envelope)
        self.at_admission.append(snapshot)

    def write(self, envelopes: Any, /) -> None:
        self.at_end.extend(envelopes)

    def close(self) -> None:
        pass


class FailingAhead(Ahead):
    def admitted(self, envelope: ExecutionEnvelope, /) -> None:
        raise OSError("disk full")


def test_a_failing_write_ahead_record_is_counted_and_the_call_goes_on(backend: Any) -> None:
    ahead = FailingAhead()
    server: Backend = backend(EnvelopeConfig(sinks=[ahead]))
    reply = server.stub.Run(pb.RunRequest(model="m"))
    (env,) = server.envelopes(1)
    assert server.interceptor.flush()
    assert reply.envelope_id == env.envelope_id
    assert [e.envelope_id for e in ahead.at_end] == [env.envelope_id]
    stats = server.interceptor.sink_stats()
    assert stats is not None
    assert (stats.submitted, stats.written, stats.failed) == (1, 1, 1)


def test_write_ahead_sink_records_admission_before_the_handler(backend: Any) -> None:
    ahead = Ahead()
    server: Backend = backend(EnvelopeConfig(sinks=[ahead]))
    reply = server.stub.Run(pb.RunRequest(model="m", behavior="bind"))
    (env,) = server.envelopes(1)
    assert server.interceptor.core.dispatcher.flush()
    (early,) = ahead.at_admission
    assert early.envelope_id == reply.envelope_id == env.envelope_id
    assert [s.to for s in early.lifecycle.transitions] == [1, 2, 3]  # RECEIVED, NORMALIZED, ADMITTED
    assert [e.envelope_id for e in ahead.at_end] == [env.envelope_id]
    assert ahead.at_end[0].lifecycle.state == 6  # COMPLETED


def test_refused_calls_are_not_written_ahead(backend: Any) -> None:
    ahead = Ahead()
    limits = LimitsPolicy([Limit(ResourceDimension.RESOURCE_DIMENSION_TOKENS, 1, deny=True)])
    server: Backend = backend(EnvelopeConfig(sinks=[ahead], policies=[limits]))
    with pytest.raises(grpc.RpcError):
        server.stub.Run(pb.RunRequest(model="m", max_tokens=5))
    server.envelopes(1)
    assert server.interceptor.core.dispatcher.flush()
    assert ahead.at_admission == []
    assert len(ahead.at_end) == 1
