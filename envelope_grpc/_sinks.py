"""Audit sinks, and the dispatcher that keeps them off the RPC path.

A call hands its envelope to the dispatcher's bounded queue and returns; a
background thread writes batches to every sink. A full queue drops the
envelope and a failing sink loses its batch: both are counted, exposed by
``stats()`` and logged, never silent and never an RPC error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Protocol, runtime_checkable

from envelope_grpc._envelope import to_json
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope

_log = logging.getLogger("envelope_grpc.sinks")


class Sink(Protocol):
    """Receives envelopes in batches, on the dispatcher's thread."""

    def write(self, envelopes: Sequence[ExecutionEnvelope], /) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class WriteAheadSink(Sink, Protocol):
    """A sink that also records each envelope when it is admitted, before the
    handler runs, so that a process that dies mid-call leaves the admitted,
    unfinished envelope behind. ``admitted`` runs on the RPC path: it gets the
    envelope itself (copy or serialize it before returning) and may block
    until the record is durable (group commit). The terminal envelope comes
    later through ``write``."""

    def admitted(self, envelope: ExecutionEnvelope, /) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class SinkStats:
    """Counts since the dispatcher started: envelopes submitted, handed to
    every sink, dropped because the queue was full, lost by a failing sink,
    and waiting."""

    submitted: int
    written: int
    dropped: int
    failed: int
    queued: int


class SinkDispatcher:
    """A bounded queue in front of ``sinks``, drained by one daemon thread."""

    def __init__(self, sinks: Sequence[Sink], *, max_queue: int = 10_000, max_batch: int = 512) -> None:
        self._sinks = tuple(sinks)
        self._queue: queue.Queue[ExecutionEnvelope | Callable[[], ExecutionEnvelope] | None] = queue.Queue(
            max_queue
        )
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._submitted = self._written = self._dropped = self._failed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="envelope-grpc-sinks", daemon=True)
        self._thread.start()

    def submit(self, envelope: ExecutionEnvelope | Callable[[], ExecutionEnvelope]) -> None:
        """Queue ``envelope`` for every sink without blocking; a function that
        returns it is called on the dispatcher's thread (the envelope is then
        built off the RPC path)."""
        try:
            with self._lock:  # so that nothing lands behind close()'s end marker
                self._submitted += 1
                if self._closed:  # nothing will write it: it counts as dropped
                    raise queue.Full
                self._queue.put_nowait(envelope)
        except queue.Full:
            with self._lock:
                self._dropped += 1
                dropped = self._dropped
            if dropped == 1 or dropped % 1000 == 0:
                _log.warning("audit queue full: %d envelope(s) dropped so far", dropped)

    def count_failure(self, lost: int) -> None:
        """Count envelopes a sink lost outside the dispatcher's thread."""
        with self._lock:
            self._failed += lost

    def stats(self) -> SinkStats:
        """What was submitted, written, dropped (queue full) and failed (sink error)."""
        with self._lock:
            return SinkStats(self._submitted, self._written, self._dropped, self._failed, self._queue.qsize())

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was handed to the sinks."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the thread, and close every sink, within
        ``timeout`` seconds; sinks still writing then are left open (and
        logged), not closed under the writer. Envelopes submitted afterwards
        count as dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):  # a full queue behind a stuck sink
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            _log.error(
                "audit sinks still writing after %g s, %d envelope(s) queued: left open",
                timeout,
                self._queue.qsize(),
            )
            return
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                _log.exception("audit sink %r failed to close", sink)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [] if first is None else [first]
            stop = first is None
            while not stop and len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._write(batch)
            for _ in range(len(batch) + (1 if stop else 0)):
                self._queue.task_done()
            if stop:
                return

    def _write(self, items: list[ExecutionEnvelope | Callable[[], ExecutionEnvelope]]) -> None:
        # "written": handed to every sink; "failed": lost by at least one.
        batch: list[ExecutionEnvelope] = []
        for item in items:
            try:
                batch.append(item if isinstance(item, ExecutionEnvelope) else item())
            except Exception:
                with self._lock:
                    self._failed += 1
                _log.exception("an envelope could not be built for the sinks")
        if not batch:
            return
        lost = False
        for sink in self._sinks:
            try:
                sink.write(batch)
            except Exception:
                lost = True
                _log.exception("audit sink %r lost %d envelope(s)", sink, len(batch))
        with self._lock:
            if lost:
                self._failed += len(batch)
            else:
                self._written += len(batch)


class JsonLinesSink:
    """One proto3-JSON envelope per line, to a file (appended) or stdout ("-")."""

    def __init__(self, path: str = "-") -> None:
        self._stream: IO[str] = sys.stdout if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._owned = path != "-"
        self._lock = threading.Lock()  # one sink may serve several servers' dispatchers

    def write(self, envelopes: Sequence[ExecutionEnvelope], /) -> None:
        """Append each envelope as one line and flush."""
        lines = "".join(to_json(env, indent=None) + "\n" for env in envelopes)
        with self._lock:
            self._stream.write(lines)
            self._stream.flush()

    def close(self) -> None:
        """Close the file (stdout stays open)."""
        if self._owned:
            self._stream.close()
