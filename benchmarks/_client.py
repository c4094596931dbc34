"""The client side: workloads, and driving them sequentially or concurrently.

Clients are synchronous ``grpc`` stubs in the parent process (threads for
concurrency), whatever the server's flavour. Every loop stops at a call count
or a time budget, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final

from benchmarks import _service
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc

SEQUENTIAL: Final = "sequential"
CONCURRENT: Final = "concurrent"
CALL_TIMEOUT: Final = 30.0  # seconds; every call carries a deadline, as real clients' do

Call = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One method called one way."""

    key: str
    method: str  # Run, Watch or Upload
    messages: int  # stream messages per call (responses of Watch, chunks of Upload); 0 for unary
    single: str = ""  # key of the same stream with one message, for the marginal cost of a message

    @property
    def label(self) -> str:
        if self.method == "Run":
            return "Run (unary)"
        plural = "" if self.messages == 1 else "s"
        if self.method == "Watch":
            return f"Watch (server stream, {self.messages} response{plural}/call)"
        return f"Upload (client stream, {self.messages} chunk{plural}/call)"

    def caller(self, stub: pb_grpc.ExecutionTestServiceStub) -> Call:
        """A function making one call of this workload (and checking its result)."""
        count = self.messages
        if self.method == "Run":
            request = _service.run_request()

            def unary() -> None:
                stub.Run(request, timeout=CALL_TIMEOUT)

            return unary
        if self.method == "Watch":
            watch = pb.WatchRequest(run=_service.run_request(count=count))

            def server_stream() -> None:
                received = sum(1 for _ in stub.Watch(watch, timeout=CALL_TIMEOUT))
                if received != count:
                    raise RuntimeError(f"Watch: {received} responses, expected {count}")

            return server_stream
        chunks = _service.upload_chunks(count)

        def client_stream() -> None:
            reply = stub.Upload(iter(chunks), timeout=CALL_TIMEOUT)
            if reply.chunks != count:
                raise RuntimeError(f"Upload: server saw {reply.chunks} chunks, expected {count}")

        return client_stream


MODES: Final = (SEQUENTIAL, CONCURRENT)


def workloads(messages: int) -> list[Workload]:
    """Unary, and both stream shapes with one and with ``messages`` messages:
    the difference between the two is the marginal cost of a stream message."""
    return [
        Workload("unary", "Run", 0),
        Workload("watch1", "Watch", 1),
        Workload("watch", "Watch", messages, single="watch1"),
        Workload("upload1", "Upload", 1),
        Workload("upload", "Upload", messages, single="upload1"),
    ]


@dataclasses.dataclass
class Run:
    """What the client saw of one loop."""

    calls: int
    wall_s: float
    latencies_ns: list[int]


def drive(call: Call, mode: str, *, concurrency: int, max_calls: int, max_seconds: float) -> Run:
    """Call back to back (one caller, or ``concurrency`` threads sharing the
    count) until ``max_calls`` calls are made or ``max_seconds`` have passed."""
    if mode == SEQUENTIAL:
        return _sequential(call, max_calls, max_seconds)
    return _concurrent(call, concurrency, max_calls, max_seconds)


def _timed(call: Call, turns: Iterable[object], deadline: int, latencies: list[int]) -> None:
    """One call per turn, each one's latency recorded, until the turns run
    out or a call ends after ``deadline`` (perf_counter_ns)."""
    clock = time.perf_counter_ns
    for _ in turns:
        before = clock()
        call()
        after = clock()
        latencies.append(after - before)
        if after >= deadline:
            return


def _sequential(call: Call, max_calls: int, max_seconds: float) -> Run:
    latencies: list[int] = []
    started = time.perf_counter_ns()
    _timed(call, range(max_calls), started + int(max_seconds * 1e9), latencies)
    return Run(len(latencies), (time.perf_counter_ns() - started) / 1e9, latencies)


def _concurrent(call: Call, concurrency: int, max_calls: int, max_seconds: float) -> Run:
    clock = time.perf_counter_ns
    tickets = itertools.count()  # next() on it is atomic in CPython
    gate = threading.Barrier(concurrency + 1)
    budget = int(max_seconds * 1e9)
    per_thread: list[list[int]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def caller(latencies: list[int]) -> None:
        gate.wait()
        try:
            turns = itertools.takewhile(lambda ticket: ticket < max_calls, tickets)
            _timed(call, turns, clock() + budget, latencies)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(out,), daemon=True) for out in per_thread]
    for thread in threads:
        thread.start()
    gate.wait()
    started = clock()
    for thread in threads:
        thread.join(max_seconds + 2 * CALL_TIMEOUT)
    wall = (clock() - started) / 1e9
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a client thread did not finish")
    latencies = [latency for out in per_thread for latency in out]
    return Run(len(latencies), wall, latencies)
