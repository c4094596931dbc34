"""The envelope ledger: every envelope in a database you can query.

``open_ledger(url)`` opens one, chosen by URL (or $ENVELOPE_GRPC_LEDGER):
``sqlite:///path/to/file.db`` (embedded, the default ``sqlite:///envelopes.db``;
four slashes for an absolute path) or ``postgresql://user@host:port/db``
(psycopg 3; the schema is created on first use). The same interface serves
both: ``ledger.sink()`` for ``EnvelopeConfig.sinks``, and queries — ``get``,
``list``, ``children``, ``lineage``, ``follow``/``tail``, ``stats``.

Writing. A ``LedgerSink`` is a write-ahead sink: it records each envelope
when admission lets it through (state ADMITTED, before the handler runs) and
again when it ends; the terminal record replaces the admission record and
never the reverse. Records go through a bounded queue to one background
writer thread per sink, which writes them in batches, one transaction each
(WAL and ``synchronous=NORMAL`` on SQLite; COPY and one upsert on
PostgreSQL). With ``durable_admission=True`` (the default) ``admitted()``
waits until the batch holding its record is committed — group commit: every
call admitted while a transaction runs shares the next one — so a process
killed after admission (even by SIGKILL) leaves the admitted envelope
behind. The cost is a commit wait on every admitted call's path, before
its handler runs. ``python -m benchmarks.ledger`` measured, on a 2-CPU
machine: SQLite about 0.2 ms (median) for a call admitted alone and about
2.5 ms when 16 calls are admitted at once (they share group commits, ~5,000
envelopes/s recorded twice each); PostgreSQL with fsync about 1 ms alone
and 4.5 ms with 16. SQLite's commits in WAL/NORMAL survive the death of the
process but not a power loss; ``?synchronous=full`` in the URL makes them
survive that too, at the cost of an fsync per commit.
``durable_admission=False`` only enqueues. When the writer
falls behind and the queue is full, ``when_full="block"`` (the default)
makes callers wait for room and ``"drop"`` drops the record; drops are
counted in ``sink.stats()``, logged, and added to the ledger's own counter
that ``stats()`` reports.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final, Literal, TypeAlias, TypedDict, Unpack

from envelope_grpc import _ledger_sql as sql
from envelope_grpc._ledger_sql import DEFAULT_URL as DEFAULT_URL
from envelope_grpc._ledger_sql import ENV_VAR as ENV_VAR
from envelope_grpc._ledger_sql import LedgerError, Row, resolve_url
from envelope_grpc._ledger_stats import DenialCount, DimensionTotals, LedgerStats, TenantRates, compute
from envelope_grpc._telemetry import KIND_NAMES, OUTCOME_NAMES, STATE_NAMES
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope

__all__ = [
    "DenialCount",
    "DimensionTotals",
    "Filters",
    "Ledger",
    "LedgerError",
    "LedgerSink",
    "LedgerSinkStats",
    "LedgerStats",
    "LineageNode",
    "TenantRates",
    "open_ledger",
]

_log = logging.getLogger("envelope_grpc.ledger")
_Envelopes: TypeAlias = list[ExecutionEnvelope]
Instant: TypeAlias = datetime.datetime | float | int
WhenFull: TypeAlias = Literal["block", "drop"]


#: The filters that take the contract's names: their name tables and long-name prefixes.
_NAMED: Final = {
    "kind": (KIND_NAMES, "execution_kind_"),
    "decision": (OUTCOME_NAMES, "decision_outcome_"),
    "state": (STATE_NAMES, "lifecycle_state_"),
}


def choices(what: str) -> list[str]:
    """The short names a ``kind``, ``decision`` or ``state`` filter takes."""
    names, _ = _NAMED[what]
    return [name for number, name in sorted(names.items()) if number]


def _choice(value: str | int | None, what: str) -> str | None:
    """A kind / decision / state filter as its stored short name."""
    if value is None:
        return None
    names, prefix = _NAMED[what]
    if isinstance(value, int):
        if value not in names:
            raise ValueError(f"unknown {what} {value}")
        return names[value]
    text = value.strip().lower().replace("-", "_").removeprefix(prefix)
    if text in names.values():
        return text
    raise ValueError(f"unknown {what} {value!r} (one of {', '.join(choices(what))})")


_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


_INT64: Final = 2**63


def _ns(value: Instant | None) -> int | None:
    """Nanoseconds since the epoch, exactly (floats lose sub-microsecond
    digits), within the 64-bit range the ledger stores them in (years
    1677 to 2262): a bound beyond it is the range's end."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.astimezone()  # naive: local time
        delta = value - _EPOCH
        ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    elif isinstance(value, int):
        ns = value * 1_000_000_000
    else:
        ns = round(value * 1e6) * 1_000  # to the microsecond, as a datetime would be
    return min(max(ns, -_INT64), _INT64 - 1)


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which envelopes a query matches; every given field must match.

    ``kind``, ``decision`` (admission's outcome) and ``state`` take the
    contract's names, short or long ("inference", "EXECUTION_KIND_INFERENCE")
    or enum numbers. ``since`` / ``until`` bound the envelope's start time
    (``since <= start < until``): datetimes (naive means local time) or Unix
    seconds. ``limit`` keeps the most recent matches.
    """

    tenant: str | None = None
    principal: str | None = None
    kind: str | int | None = None
    decision: str | int | None = None
    state: str | int | None = None
    method: str | None = None
    trace_id: str | None = None
    since: Instant | None = None
    until: Instant | None = None
    limit: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition (``?`` placeholders) and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        exact = (
            ("tenant", self.tenant),
            ("principal", self.principal),
            ("kind", _choice(self.kind, "kind")),
            ("decision", _choice(self.decision, "decision")),
            ("state", _choice(self.state, "state")),
            ("method", self.method),
            ("trace_id", self.trace_id.lower() if self.trace_id else None),
        )
        for column, value in exact:
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        since, until = _ns(self.since), _ns(self.until)
        if since is not None:
            clauses.append("start_ns >= ?")
            params.append(since)
        if until is not None:
            clauses.append("start_ns < ?")
            params.append(until)
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be at least 1")
        return " AND ".join(clauses) or "1 = 1", params


@dataclasses.dataclass(frozen=True)
class LineageNode:
    """One envelope of a lineage tree and the envelopes it caused."""

    envelope: ExecutionEnvelope
    children: tuple[LineageNode, ...] = ()

    def walk(self, depth: int = 0) -> Iterator[tuple[int, ExecutionEnvelope]]:
        """Every envelope of the tree with its depth below this node, parents first."""
        yield depth, self.envelope
        for child in self.children:
            yield from child.walk(depth + 1)


# -- the sink ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerSinkStats:
    """A sink's counts of records (an envelope makes an admission record and a
    terminal one) since it was made."""

    received: int
    written: int
    dropped: int
    failed: int
    queued: int
    batches: int


class _Waiter:
    """What ``admitted`` waits on when its record must be durable."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None


_Item: TypeAlias = tuple[Row, _Waiter | None]


class SinkOptions(TypedDict, total=False):
    """How a LedgerSink writes (see LedgerSink)."""

    durable_admission: bool
    when_full: WhenFull
    max_queue: int
    max_batch: int
    admission_timeout: float


def _wake(items: Iterable[_Item], error: str | None) -> None:
    """Tell whoever waits on ``items`` that they are committed (or why not)."""
    for _, waiter in items:
        if waiter is not None:
            waiter.error = error
            waiter.done.set()


class LedgerSink:
    """A write-ahead audit sink into the ledger at ``url`` (see the module docs).

    ``durable_admission``: ``admitted()`` returns once its record is committed
    (at most ``admission_timeout`` seconds, then it raises LedgerError, which
    the interceptor counts and logs; the call goes on). ``when_full``:
    "block" or "drop" when ``max_queue`` records wait. ``max_batch``: records
    per transaction. ``close()`` writes what is queued and stops the writer;
    several servers may share one sink, so records that still arrive after
    that are written at once on the caller's thread.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        durable_admission: bool = True,
        when_full: WhenFull = "block",
        max_queue: int = 10_000,
        max_batch: int = 2_000,
        admission_timeout: float = 10.0,
    ) -> None:
        if when_full not in ("block", "drop"):
            raise ValueError(f"when_full must be 'block' or 'drop', not {when_full!r}")
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self._store = sql.open_store(resolve_url(url))
        self._conn = self._store.open_writer(ensure_schema=True)
        self.url = self._store.url
        self.durable_admission = durable_admission
        self.when_full = when_full
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._timeout = admission_timeout
        self._items: collections.deque[_Item] = collections.deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits for records
        self._room = threading.Condition(self._lock)  # blocked callers wait for room
        self._idle = threading.Condition(self._lock)  # flush waits for an empty pipeline
        self._in_flight = 0
        self._received = self._written = self._dropped = self._failed = self._batches = 0
        self._unrecorded_drops = 0  # not yet added to the ledger's counter
        self._closing = self._stopped = False
        self._late = threading.Lock()  # serializes writes after the writer stopped
        self._thread = threading.Thread(target=self._run, name="envelope-grpc-ledger", daemon=True)
        self._thread.start()

    # -- the Sink and WriteAheadSink protocols --------------------------------------------

    def admitted(self, envelope: ExecutionEnvelope, /) -> None:
        """Record ``envelope`` as admitted; with durable admission, wait until
        it is committed."""
        waiter = _Waiter() if self.durable_admission else None
        if not self._put([(sql.row(envelope), waiter)]) or waiter is None:
            return
        if not waiter.done.wait(self._timeout):
            raise LedgerError(f"admission record not committed within {self._timeout:g} s")
        if waiter.error is not None:
            raise LedgerError(f"admission record lost: {waiter.error}")

    def write(self, envelopes: Sequence[ExecutionEnvelope], /) -> None:
        """Queue the terminal records of ``envelopes`` (the dispatcher's batch)."""
        self._put([(sql.row(env), None) for env in envelopes])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record queued so far is committed (or lost)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._items and not self._in_flight, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop the writer thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._work.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            _log.error("ledger writer still busy after %g s; %d record(s) queued", timeout, len(self._items))
            return
        self._conn.close()

    def stats(self) -> LedgerSinkStats:
        """Records received, committed, dropped (queue full), failed, queued; batches."""
        with self._lock:
            return LedgerSinkStats(
                self._received, self._written, self._dropped, self._failed, len(self._items), self._batches
            )

    # -- queueing -------------------------------------------------------------------------

    def _put(self, items: list[_Item]) -> bool:
        """Queue ``items``; False when any was dropped. After the writer
        stopped they are written here and now."""
        late: list[_Item] = []
        dropped = total = 0
        with self._lock:
            self._received += len(items)
            for item in items:
                if not self._stopped and len(self._items) >= self._max_queue:
                    if self.when_full == "drop":
                        dropped += 1
                        continue
                    self._work.notify()
                    while len(self._items) >= self._max_queue and not self._stopped:
                        self._room.wait()
                if self._stopped:
                    late.append(item)
                else:
                    self._items.append(item)
            self._work.notify()
            if dropped:
                self._dropped += dropped
                self._unrecorded_drops += dropped
                total = self._dropped
        if dropped and (total == dropped or total // 1000 != (total - dropped) // 1000):
            _log.warning("ledger queue full: %d record(s) dropped so far", total)
        if late:
            self._write_late(late)
        return not dropped

    def _write_late(self, items: list[_Item]) -> None:
        rows = sql.newest(found for found, _ in items)
        error: str | None = None
        with self._late:
            try:
                conn = self._store.open_writer()
                try:
                    self._store.write_batch(conn, rows)
                finally:
                    conn.close()
            except Exception as failure:
                error = sql.first_line(failure)
        with self._lock:
            if error is None:
                self._written += len(items)
            else:
                self._failed += len(items)
        _wake(items, error)
        if error is not None:
            _log.error("ledger lost %d record(s): %s", len(items), error)
            raise LedgerError(f"ledger write failed: {error}")

    # -- the writer thread ----------------------------------------------------------------

    def _take(self) -> tuple[list[_Item], int] | None:
        with self._lock:
            while not self._items and not self._closing:
                self._work.wait()
            if not self._items:
                self._stopped = True
                self._room.notify_all()
                self._idle.notify_all()
                return None
            if len(self._items) <= self._max_batch:
                batch = list(self._items)
                self._items.clear()
            else:
                batch = [self._items.popleft() for _ in range(self._max_batch)]
            self._in_flight = len(batch)
            drops, self._unrecorded_drops = self._unrecorded_drops, 0
            self._room.notify_all()
            return batch, drops

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            batch, drops = taken
            error = self._commit(sql.newest(found for found, _ in batch), drops)
            with self._lock:
                self._in_flight = 0
                if error is None:
                    self._written += len(batch)
                    self._batches += 1
                else:
                    self._failed += len(batch)
                    self._unrecorded_drops += drops
                self._idle.notify_all()
            _wake(batch, error)

    def _commit(self, rows: list[Row], drops: int) -> str | None:
        """Write one batch, retrying once; None, or why it was lost. The
        writer thread must never die, so every error is caught."""
        try:
            self._store.write_batch(self._conn, rows, drops)
            return None
        except Exception as error:
            _log.warning("ledger batch failed, retrying once: %s", error)
        time.sleep(0.05)
        try:
            self._reconnect()
            self._store.write_batch(self._conn, rows, drops)
            return None
        except Exception as error:
            _log.error("ledger lost a batch of %d record(s): %s", len(rows), error)
            return sql.first_line(error)

    def _reconnect(self) -> None:
        try:
            self._conn.execute("SELECT 1")
        except Exception:
            try:
                self._conn.close()
            finally:
                self._conn = self._store.open_writer()


# -- the ledger ------------------------------------------------------------------------------

_SELECT: Final = "SELECT envelope FROM envelopes"


class Ledger:
    """Queries over one ledger database, and sinks that write to it.

    Open one with ``open_ledger``. Thread-safe: queries share one connection
    under a lock. Close it when done (or use it as a context manager).
    """

    def __init__(self, url: str | None = None, *, create: bool = True) -> None:
        resolved = resolve_url(url)
        self._store = sql.open_store(resolved)
        self._url = resolved
        self._conn = self._store.connect(create=create)
        try:
            if create:
                self._store.ensure_schema(self._conn)
            else:
                self._store.check_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise
        self._lock = threading.Lock()
        self._writer_ready = False

    @property
    def url(self) -> str:
        """The ledger's URL (password redacted)."""
        return self._store.url

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger's connection."""
        with self._lock:
            self._conn.close()

    def sink(self, **options: Unpack[SinkOptions]) -> LedgerSink:
        """A LedgerSink writing to this ledger, for ``EnvelopeConfig.sinks``
        (options as LedgerSink takes them)."""
        return LedgerSink(self._url, **options)

    @contextlib.contextmanager
    def _using(self, what: str) -> Iterator[Any]:
        """The connection, under the lock; an error leaves any open
        transaction and becomes a one-line LedgerError about ``what``."""
        with self._lock:
            try:
                yield self._conn
            except Exception as error:
                self._store.rollback(self._conn)
                raise self._store.describe_error(what, error) from None

    def write(self, envelopes: Iterable[ExecutionEnvelope]) -> None:
        """Upsert ``envelopes`` now, in one transaction (no queue, no thread)."""
        rows = sql.newest(sql.row(env) for env in envelopes)
        if not rows:
            return
        with self._using("write to") as conn:
            if not self._writer_ready:
                self._store.prepare_writer(conn)
                self._writer_ready = True
            self._store.write_batch(conn, rows)

    # -- queries ---------------------------------------------------------------------------

    def _fetch(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._using("read") as conn:
            return self._store.fetch(conn, query, params)

    def _envelopes(self, query: str, params: Sequence[Any] = ()) -> _Envelopes:
        return [sql.parse(bytes(blob)) for (blob,) in self._fetch(query, params)]

    def get(self, envelope_id: str) -> ExecutionEnvelope | None:
        """The envelope with ``envelope_id``, or with an id starting with it
        when exactly one does; None when there is none. LedgerError when a
        prefix is ambiguous; ValueError when it is not hexadecimal."""
        wanted = envelope_id.strip().lower()
        if not wanted or any(c not in "0123456789abcdef" for c in wanted) or len(wanted) > 32:
            raise ValueError(f"not an envelope id: {envelope_id!r}")
        if len(wanted) == 32:
            found = self._envelopes(f"{_SELECT} WHERE envelope_id = ?", (wanted,))
            return found[0] if found else None
        # Ids are lowercase hex, so every id with the prefix sorts in [prefix, prefix + "g").
        rows = self._fetch(
            "SELECT envelope_id, envelope FROM envelopes WHERE envelope_id >= ? AND envelope_id < ?"
            " ORDER BY envelope_id LIMIT 2",
            (wanted, wanted + "g"),
        )
        if len(rows) > 1:
            raise LedgerError(f"envelope id prefix {wanted!r} is ambiguous ({rows[0][0]}, {rows[1][0]}, ...)")
        return sql.parse(bytes(rows[0][1])) if rows else None

    def list(self, filters: Filters | None = None, /, **fields: Any) -> _Envelopes:
        """Matching envelopes, oldest first; with a limit, the most recent ones.
        Filters may be given as keywords: ``ledger.list(tenant="acme")``."""
        query, params, limited = _matching(filters, fields)
        if not limited:
            return self._envelopes(f"{query} ORDER BY start_ns, envelope_id", params)
        recent = self._envelopes(query, params)
        recent.reverse()
        return recent

    def children(self, envelope_id: str) -> _Envelopes:
        """The envelopes whose parent is ``envelope_id``, oldest first."""
        query = f"{_SELECT} WHERE parent_id = ? ORDER BY start_ns, envelope_id"
        return self._envelopes(query, (envelope_id,))

    def lineage(self, envelope_id: str) -> LineageNode | None:
        """The whole tree ``envelope_id`` belongs to, from its root (None when
        the envelope is unknown). A recorded envelope whose parent was never
        recorded hangs under the root."""
        env = self.get(envelope_id)
        if env is None:
            return None
        root_id = env.lineage.root_envelope_id or env.envelope_id
        members = self._envelopes(
            f"{_SELECT} WHERE root_id = ? OR envelope_id = ? ORDER BY start_ns, envelope_id",
            (root_id, root_id),
        )
        known = {member.envelope_id for member in members}
        below: dict[str, _Envelopes] = collections.defaultdict(list)
        root: ExecutionEnvelope | None = None
        for member in members:
            if member.envelope_id == root_id:
                root = member
            else:
                parent = member.lineage.parent_envelope_id
                below[parent if parent in known else root_id].append(member)
        if root is None:  # the root itself was not recorded (e.g. another service's ledger)
            root = ExecutionEnvelope(envelope_id=root_id)

        def node(env: ExecutionEnvelope, seen: frozenset[str]) -> LineageNode:
            seen = seen | {env.envelope_id}
            kids = [kid for kid in below.get(env.envelope_id, []) if kid.envelope_id not in seen]
            return LineageNode(env, tuple(node(kid, seen) for kid in kids))

        return node(root, frozenset())

    def cursor(self) -> int:
        """The ledger's current write position: ``follow`` from here sees only
        what is written after now."""
        ((top,),) = self._fetch(sql.TOP_SEQ)
        return int(top)

    def recent(self, count: int, filters: Filters | None = None) -> tuple[_Envelopes, int]:
        """The last ``count`` matching envelopes written, in write order, and
        the cursor from which ``follow`` continues after them (``count``, not
        the filters' limit, bounds them)."""
        position = self.cursor()
        where, params = (filters or Filters()).where()
        found = self._envelopes(
            f"{_SELECT} WHERE seq <= ? AND {where} ORDER BY seq DESC LIMIT ?", [position, *params, count]
        )
        found.reverse()
        return found, position

    def follow(
        self, cursor: int = 0, filters: Filters | None = None, *, limit: int = 1000
    ) -> tuple[_Envelopes, int]:
        """Envelopes written (new, or changed: an admission record replaced by
        its terminal one) after ``cursor``, in write order, at most ``limit``
        of them (the filters' limit does not apply), and the cursor to pass
        next time."""
        where, params = (filters or Filters()).where()
        rows = self._fetch(
            f"SELECT seq, envelope FROM envelopes WHERE seq > ? AND {where} ORDER BY seq LIMIT ?",
            [cursor, *params, limit],
        )
        if not rows:
            return [], cursor
        return [sql.parse(bytes(blob)) for _, blob in rows], int(rows[-1][0])

    def tail(
        self,
        cursor: int | None = None,
        filters: Filters | None = None,
        *,
        interval: float = 0.5,
        stop: threading.Event | None = None,
    ) -> Iterator[ExecutionEnvelope]:
        """Follow the ledger: yield every envelope written after ``cursor``
        (default: now), polling every ``interval`` seconds, until ``stop`` is set."""
        position = self.cursor() if cursor is None else cursor
        while stop is None or not stop.is_set():
            found, position = self.follow(position, filters)
            yield from found
            if not found:
                if stop is not None:
                    stop.wait(interval)
                else:
                    time.sleep(interval)

    def dropped(self) -> int:
        """Records that sinks dropped because their queue was full."""
        found = self._fetch(sql.DROPPED)
        return int(found[0][0]) if found else 0

    def stats(self, filters: Filters | None = None, /, **fields: Any) -> LedgerStats:
        """Requested vs granted per tenant and dimension, denial reasons and
        narrowing rates over the matching envelopes (see LedgerStats)."""
        query, params, _ = _matching(filters, fields)
        dropped = self.dropped()
        with self._using("read") as conn:
            rows = self._store.stream(conn, query, params)
            return compute((sql.parse(bytes(blob)) for (blob,) in rows), dropped)


def _matching(filters: Filters | None, fields: dict[str, Any]) -> tuple[str, list[Any], bool]:
    """The query of the envelopes ``filters`` (updated by ``fields``) match,
    its parameters, and whether it keeps only the most recent ``limit``."""
    filters = dataclasses.replace(filters or Filters(), **fields)
    where, params = filters.where()
    query = f"{_SELECT} WHERE {where}"
    if filters.limit is None:
        return query, params, False
    return f"{query} ORDER BY start_ns DESC, envelope_id DESC LIMIT ?", [*params, filters.limit], True


def open_ledger(url: str | None = None, *, create: bool = True) -> Ledger:
    """The ledger at ``url`` (default: $ENVELOPE_GRPC_LEDGER, else
    sqlite:///envelopes.db). ``create=False`` opens only an existing ledger
    (LedgerError otherwise), as readers do."""
    return Ledger(url, create=create)
