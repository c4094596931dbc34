"""The ledger's storage: one table of envelopes, in SQLite or PostgreSQL.

A row holds the indexed facts of one envelope and the whole envelope as
protobuf bytes. Rows are upserted by envelope id; an update only lands when
it moves the envelope forward — a terminal record replaces a non-terminal
one, and otherwise a record with more lifecycle steps replaces one with
fewer — so a late admission record never overwrites the terminal one.

``parent_id`` and ``root_id`` are NULL for a root envelope (a NULL key costs
an index little, a random id a lot); a tree is ``root_id = R OR envelope_id = R``.

Every write also stamps the row with the next value of a ledger-wide write
sequence (``seq``), which readers follow as a cursor. Writers serialize their
transactions (SQLite's write lock; a PostgreSQL advisory lock), so sequence
order is commit order and a cursor never skips a row committed later with a
smaller number.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final, TypeAlias

from envelope_grpc._envelope import TERMINAL
from envelope_grpc._telemetry import KIND_NAMES, OUTCOME_NAMES, STATE_NAMES
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope

#: The environment variable naming the ledger, and the ledger used without one.
ENV_VAR: Final = "ENVELOPE_GRPC_LEDGER"
DEFAULT_URL: Final = "sqlite:///envelopes.db"

#: The columns a writer fills, in order (``seq`` is added by the writer).
COLUMNS: Final = (
    "envelope_id",
    "start_ns",
    "end_ns",
    "tenant",
    "principal",
    "kind",
    "decision",
    "state",
    "method",
    "trace_id",
    "parent_id",
    "root_id",
    "steps",
    "terminal",
    "envelope",
)
#: Columns indexed for the ledger's filters (the id is the primary key).
INDEXED: Final = (
    "start_ns",
    "tenant",
    "principal",
    "kind",
    "decision",
    "state",
    "method",
    "trace_id",
    "parent_id",
    "root_id",
    "seq",
)
# What an update may change: everything else is fixed once an envelope is
# admitted (who, what, lineage, the admission decision), and an index whose
# columns are not updated costs nothing.
_UPDATED: Final = ("end_ns", "state", "steps", "terminal", "seq", "envelope")
_STEPS: Final = COLUMNS.index("steps")
_TERMINAL: Final = COLUMNS.index("terminal")
_SCHEMA_VERSION: Final = 1
_META: Final = "envelope_ledger_meta"
#: The highest write position in the ledger (0 when empty).
TOP_SEQ: Final = "SELECT COALESCE(MAX(seq), 0) FROM envelopes"
#: The count of records sinks dropped (one row, or none in an old ledger).
DROPPED: Final = f"SELECT value FROM {_META} WHERE name = 'dropped'"

#: One envelope as a row: the values of COLUMNS.
Row: TypeAlias = tuple[
    str, int, int | None, str, str, str, str, str, str, str, str | None, str | None, int, int, bytes
]


class LedgerError(Exception):
    """The ledger cannot be opened, read or written; the message is one line."""


def row(env: ExecutionEnvelope) -> Row:
    """The row of ``env``: its indexed facts and its serialized bytes."""
    lifecycle = env.lifecycle
    state = lifecycle.state
    start = lifecycle.start_time
    end = lifecycle.end_time
    principal = env.principal
    execution = env.execution
    lineage = env.lineage
    envelope_id = env.envelope_id
    terminal = state in TERMINAL
    return (
        envelope_id,
        start.seconds * 1_000_000_000 + start.nanos,
        end.seconds * 1_000_000_000 + end.nanos if terminal else None,
        principal.tenant,
        principal.subject,
        KIND_NAMES.get(execution.kind, str(execution.kind)),
        OUTCOME_NAMES.get(env.decision.outcome, str(env.decision.outcome)),
        STATE_NAMES.get(state, str(state)),
        execution.method,
        env.trace_id,
        lineage.parent_envelope_id or None,
        lineage.root_envelope_id or None,
        len(lifecycle.transitions),
        1 if terminal else 0,
        env.SerializeToString(),
    )


def newest(rows: Iterable[Row]) -> list[Row]:
    """One row per envelope id, the furthest along (terminal, then most steps),
    in first-seen order: a batch never upserts one envelope twice."""
    best: dict[str, Row] = {}
    for found in rows:
        key = found[0]
        kept = best.get(key)
        if kept is None or (found[_TERMINAL], found[_STEPS]) > (kept[_TERMINAL], kept[_STEPS]):
            best[key] = found
    return list(best.values())


def parse(blob: bytes) -> ExecutionEnvelope:
    """An envelope from its stored bytes."""
    env = ExecutionEnvelope()
    env.ParseFromString(blob)
    return env


def resolve_url(url: str | None = None) -> str:
    """``url``, else $ENVELOPE_GRPC_LEDGER, else the default SQLite file."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def redact(url: str) -> str:
    """``url`` without its password (in its user part or its query), for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in pairs):
        hidden = [(key, "***" if key.lower() == "password" else value) for key, value in pairs]
        parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*"))
    return urllib.parse.urlunsplit(parts)


def first_line(error: BaseException) -> str:
    """An error as one line: its message's first line, or its type."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


_GUARD: Final = (
    "excluded.terminal > envelopes.terminal"
    " OR (excluded.terminal = envelopes.terminal AND excluded.steps > envelopes.steps)"
)


_COLUMN_LIST: Final = ", ".join(COLUMNS)


def _upsert(source: str) -> str:
    """Insert the rows of ``source`` (VALUES or a SELECT of COLUMNS and seq),
    updating an envelope's row only when the new one is further along."""
    updates = ", ".join(f"{name} = excluded.{name}" for name in _UPDATED)
    return (
        f"INSERT INTO envelopes ({_COLUMN_LIST}, seq) {source}"
        f" ON CONFLICT (envelope_id) DO UPDATE SET {updates} WHERE {_GUARD}"
    )


class Store(abc.ABC):
    """One ledger database: how to connect, create the schema and write a batch.

    Queries are shared: they are written with ``?`` placeholders, which
    ``sql`` turns into the dialect's own.
    """

    #: The URL the store was opened with (password redacted).
    url: str
    #: CREATE TABLE envelopes, in the dialect's column types.
    _TABLE: str

    @abc.abstractmethod
    def connect(self, *, create: bool) -> Any:
        """A new connection, in autocommit mode; LedgerError when impossible."""

    @abc.abstractmethod
    def ensure_schema(self, conn: Any) -> None:
        """Create the table, indexes and counters when missing."""

    @abc.abstractmethod
    def write_batch(self, conn: Any, rows: Sequence[Row], dropped: int = 0) -> None:
        """Upsert ``rows`` (one per envelope id) and add ``dropped`` to the
        ledger's drop counter, in one transaction."""

    @abc.abstractmethod
    def prepare_writer(self, conn: Any) -> None:
        """Get a new connection ready for ``write_batch``."""

    def open_writer(self, *, ensure_schema: bool = False) -> Any:
        """A new connection ready for ``write_batch``, the schema made first
        when ``ensure_schema``; closed again when it cannot be made ready."""
        conn = self.connect(create=True)
        try:
            if ensure_schema:
                self.ensure_schema(conn)
            self.prepare_writer(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def sql(self, text: str) -> str:
        """``text`` with the dialect's placeholders."""
        return text

    def _create_objects(self, conn: Any) -> None:
        """The table, its indexes and the counters, when missing (inside the
        caller's transaction)."""
        conn.execute(self._TABLE)
        for column in INDEXED:
            conn.execute(f"CREATE INDEX IF NOT EXISTS envelopes_{column} ON envelopes ({column})")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {_META} (name text PRIMARY KEY, value bigint)")
        seed = f"INSERT INTO {_META} VALUES ('schema_version', ?), ('dropped', 0)"
        conn.execute(self.sql(f"{seed} ON CONFLICT (name) DO NOTHING"), (_SCHEMA_VERSION,))

    def _add_dropped(self, cursor: Any, dropped: int) -> None:
        cursor.execute(self.sql(f"UPDATE {_META} SET value = value + ? WHERE name = 'dropped'"), (dropped,))

    def fetch(self, conn: Any, query: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of ``query``."""
        return list(conn.execute(self.sql(query), tuple(params)).fetchall())

    def check_schema(self, conn: Any) -> None:
        """LedgerError unless the database holds an envelope ledger."""
        try:
            conn.execute(f"SELECT value FROM {_META} WHERE name = 'schema_version'").fetchone()
            conn.execute("SELECT envelope_id FROM envelopes LIMIT 1").fetchone()
        except Exception as error:
            self.rollback(conn)
            raise LedgerError(f"{self.url} holds no envelope ledger ({first_line(error)})") from None

    def stream(self, conn: Any, query: str, params: Sequence[Any] = ()) -> Iterator[Any]:
        """The rows of ``query``, a few hundred at a time."""
        cursor = conn.execute(self.sql(query), tuple(params))
        while chunk := cursor.fetchmany(500):
            yield from chunk

    def rollback(self, conn: Any) -> None:
        """Leave a failed transaction, if one is open."""
        with contextlib.suppress(Exception):
            conn.rollback()

    def describe_error(self, what: str, error: BaseException) -> LedgerError:
        """A one-line LedgerError for a failed ``what``."""
        return LedgerError(f"cannot {what} {self.url}: {first_line(error)}")


def open_store(url: str) -> Store:
    """The store a ledger URL names: sqlite:///path or postgresql://..."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return SqliteStore(url)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    raise LedgerError(f"unsupported ledger URL {redact(url)!r}: use sqlite:///PATH or postgresql://...")


# -- SQLite ------------------------------------------------------------------------------

_SYNCHRONOUS: Final = ("off", "normal", "full", "extra")
# Rows per statement at most: 16 parameters each, well under SQLite's 32766.
_CHUNK: Final = 256


#: The envelopes table of both backends; only the type of the serialized
#: envelope differs (SQLite gives bigint and smallint integer affinity).
_ENVELOPES_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS envelopes ("
    " envelope_id text PRIMARY KEY, start_ns bigint NOT NULL, end_ns bigint,"
    " tenant text NOT NULL, principal text NOT NULL, kind text NOT NULL,"
    " decision text NOT NULL, state text NOT NULL, method text NOT NULL,"
    " trace_id text NOT NULL, parent_id text, root_id text,"
    " steps integer NOT NULL, terminal smallint NOT NULL, seq bigint NOT NULL,"
    " envelope {blob} NOT NULL)"
)


class SqliteStore(Store):
    """An SQLite file in WAL mode; sqlite:///relative.db or sqlite:////absolute.db.

    ``?synchronous=full`` in the URL makes every commit survive power loss,
    not only the death of the process (the default, NORMAL, is the latter).
    """

    _TABLE = _ENVELOPES_TABLE.format(blob="BLOB")

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        if parts.netloc or not parts.path.startswith("/") or len(parts.path) < 2:
            raise LedgerError(
                f"bad SQLite ledger URL {url!r}: use sqlite:///relative/file.db or sqlite:////absolute/file.db"
            )
        self.path = parts.path[1:]
        options = dict(urllib.parse.parse_qsl(parts.query))
        self.synchronous = options.pop("synchronous", "normal").lower()
        if self.synchronous not in _SYNCHRONOUS or options:
            raise LedgerError(f"bad SQLite ledger URL {url!r}: the only option is synchronous=normal|full")
        self._statements: dict[int, str] = {}

    def connect(self, *, create: bool) -> sqlite3.Connection:
        try:
            if create:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            else:
                if not os.path.exists(self.path):
                    raise LedgerError(f"no ledger at {self.path} (nothing was recorded there yet)")
                # Never create a file for a reader; a read-only file is still readable.
                uri = "file:" + urllib.parse.quote(os.path.abspath(self.path))
                mode = "rw" if os.access(self.path, os.W_OK) else "ro"
                conn = sqlite3.connect(
                    f"{uri}?mode={mode}", uri=True, timeout=30, isolation_level=None, check_same_thread=False
                )
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as error:
            raise self.describe_error("open", error) from None
        return conn

    def ensure_schema(self, conn: Any) -> None:
        try:
            # WAL is persistent; writers and readers then never block each other.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._create_objects(conn)
                conn.execute("COMMIT")
            except BaseException:
                self.rollback(conn)
                raise
        except sqlite3.DatabaseError as error:
            raise self.describe_error("create the ledger in", error) from None

    def _statement(self, count: int) -> str:
        """The upsert of ``count`` rows in one statement. Parameters are
        numbered: the rows' values one after the other, then the sequence
        number before the first row, which row k adds k to."""
        found = self._statements.get(count)
        if found is None:
            width = len(COLUMNS)
            base = count * width + 1
            rows = (
                "(" + ", ".join(f"?{k * width + j + 1}" for j in range(width)) + f", ?{base} + {k + 1})"
                for k in range(count)
            )
            found = self._statements[count] = _upsert("VALUES " + ", ".join(rows))
        return found

    def write_batch(self, conn: Any, rows: Sequence[Row], dropped: int = 0) -> None:
        conn.execute("BEGIN IMMEDIATE")  # takes the write lock: seq below is ours alone
        try:
            (top,) = conn.execute(TOP_SEQ).fetchone()
            # Multi-row statements, in power-of-two sizes so that a few prepared
            # statements serve every batch: executemany steps once per row and
            # gives up the GIL each time, which a busy server makes costly.
            done = 0
            while done < len(rows):
                count = 1 << (min(_CHUNK, len(rows) - done).bit_length() - 1)
                params = list(itertools.chain.from_iterable(rows[done : done + count]))
                params.append(top + done)
                conn.execute(self._statement(count), params)
                done += count
            if dropped:
                self._add_dropped(conn, dropped)
            conn.execute("COMMIT")
        except BaseException:
            self.rollback(conn)
            raise

    def prepare_writer(self, conn: Any) -> None:
        conn.execute("PRAGMA cache_size = -32768")  # 32 MiB: the indexes of recent rows stay hot


# -- PostgreSQL ----------------------------------------------------------------------------

# pg_advisory_xact_lock key serializing ledger writers (and schema creation):
# "envl" in ASCII.
_LOCK: Final = 0x656E766C


class PostgresStore(Store):
    """A PostgreSQL database through psycopg 3; the schema is made on first use.

    A batch is COPied into a per-connection staging table and upserted from
    there with one INSERT ... ON CONFLICT.
    """

    _TABLE = _ENVELOPES_TABLE.format(blob="bytea")
    _UPSERT: Final = _upsert(f"SELECT {_COLUMN_LIST}, nextval('envelopes_seq') FROM envelope_staging")

    def __init__(self, url: str) -> None:
        self.url = redact(url)
        self._conninfo = url

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def connect(self, *, create: bool) -> Any:
        import psycopg  # only when a PostgreSQL ledger is used

        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self._conninfo:
            options["connect_timeout"] = 10
        try:
            return psycopg.connect(self._conninfo, **options)
        except psycopg.Error as error:
            raise self.describe_error("connect to", error) from None
        except Exception as error:  # a malformed URL
            raise LedgerError(f"bad PostgreSQL ledger URL {self.url!r}: {first_line(error)}") from None

    def ensure_schema(self, conn: Any) -> None:
        import psycopg

        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))  # two first users may race
                conn.execute("CREATE SEQUENCE IF NOT EXISTS envelopes_seq")
                self._create_objects(conn)
        except psycopg.Error as error:
            raise self.describe_error("create the ledger in", error) from None

    def stream(self, conn: Any, query: str, params: Sequence[Any] = ()) -> Iterator[Any]:
        # A server-side cursor: a plain one would fetch every row at once.
        with conn.transaction(), conn.cursor(name="envelope_ledger_stream") as cursor:
            cursor.execute(self.sql(query), tuple(params))
            while chunk := cursor.fetchmany(500):
                yield from chunk

    def prepare_writer(self, conn: Any) -> None:
        # The staging table of this connection's batches (no constraints: CREATE AS).
        conn.execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS envelope_staging ON COMMIT DELETE ROWS AS"
            f" SELECT {_COLUMN_LIST} FROM envelopes WITH NO DATA"
        )

    def write_batch(self, conn: Any, rows: Sequence[Row], dropped: int = 0) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))  # seq order = commit order
            with conn.cursor() as cursor:
                with cursor.copy(f"COPY envelope_staging ({_COLUMN_LIST}) FROM STDIN") as copy:
                    for found in rows:
                        copy.write_row(found)
                cursor.execute(self._UPSERT)
                if dropped:
                    self._add_dropped(cursor, dropped)
