"""A throwaway PostgreSQL server from the machine's own binaries, for the
ledger's tests and benchmark.

``initdb`` refuses to run as root: as root, the server runs as an
unprivileged user (``nobody`` by default) through ``setpriv`` or ``runuser``,
in a temporary directory that user owns. It listens on 127.0.0.1 only, on a
free port, with trust authentication for one superuser; ``stop()`` shuts it
down and removes the directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from typing import Final

_SUPERUSER: Final = "envelope"
_SEARCH: Final = ("/usr/local/bin", "/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/opt/homebrew/bin")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why."""


def find_binaries() -> str:
    """The directory holding initdb and pg_ctl; PostgresUnavailable when none does."""
    found = shutil.which("initdb")
    candidates = [os.path.dirname(found)] if found else []
    for pattern in _SEARCH:
        candidates.extend(sorted(glob.glob(pattern), reverse=True))
    for directory in candidates:
        if all(os.access(os.path.join(directory, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return directory
    raise PostgresUnavailable("no initdb/pg_ctl found (looked on PATH and in /usr/lib/postgresql/*/bin)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TemporaryPostgres:
    """A PostgreSQL server in a temporary directory; ``start()``, then ``url()``."""

    def __init__(self, *, fsync: bool = True, user: str = "nobody") -> None:
        self.fsync = fsync
        self.port = 0
        self._user = user
        self._bin = ""
        self._root = ""
        self._group = ""
        self._running = False

    @property
    def _data(self) -> str:
        return os.path.join(self._root, "data")

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        setpriv = shutil.which("setpriv")
        if setpriv:
            return [setpriv, f"--reuid={self._user}", f"--regid={self._group}", "--clear-groups", *argv]
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self._user, "--", *argv]
        raise PostgresUnavailable("running as root and neither setpriv nor runuser is available")

    def _run(self, argv: list[str], what: str, timeout: float = 60) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        try:
            done = subprocess.run(
                self._as_owner(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PostgresUnavailable(f"{what} failed: {error}") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            log = os.path.join(self._root, "log")
            if os.path.exists(log):
                with open(log, encoding="utf-8", errors="replace") as lines:
                    detail += lines.read().strip().splitlines()[-5:]
            raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {' | '.join(detail[-6:])}")

    def start(self) -> TemporaryPostgres:
        """initdb and start the server; PostgresUnavailable (with the reason) when impossible."""
        self._bin = find_binaries()
        # Not under a private temp dir: the unprivileged owner must reach it.
        self._root = tempfile.mkdtemp(
            prefix="envelope-grpc-pg-", dir="/tmp" if os.path.isdir("/tmp") else None
        )
        try:
            if os.geteuid() == 0:
                try:
                    owner = pwd.getpwnam(self._user)
                except KeyError:
                    raise PostgresUnavailable(
                        f"running as root and there is no user {self._user!r}"
                    ) from None
                self._group = str(owner.pw_gid)
                os.chown(self._root, owner.pw_uid, owner.pw_gid)
            os.chmod(self._root, 0o700)
            self._run(
                [
                    os.path.join(self._bin, "initdb"),
                    "-D",
                    self._data,
                    "-U",
                    _SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                "initdb",
            )
            options = f"-h 127.0.0.1 -k {self._root} -c max_connections=50 -c shared_buffers=64MB"
            if not self.fsync:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            for attempt in range(3):  # the free port may be taken between probe and start
                self.port = _free_port()
                try:
                    self._run(
                        [
                            os.path.join(self._bin, "pg_ctl"),
                            "-D",
                            self._data,
                            "-l",
                            os.path.join(self._root, "log"),
                            "-o",
                            f"{options} -p {self.port}",
                            "-w",
                            "-t",
                            "30",
                            "start",
                        ],
                        "pg_ctl start",
                    )
                    break
                except PostgresUnavailable:
                    if attempt == 2:
                        raise
            self._running = True
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str = "postgres") -> str:
        """A connection URL for ``database``."""
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database; its URL."""
        import psycopg

        name = name or f"ledger_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (immediately: its data is thrown away) and remove its directory."""
        if self._running:
            self._running = False
            with contextlib.suppress(PostgresUnavailable):
                self._run(
                    [os.path.join(self._bin, "pg_ctl"), "-D", self._data, "-m", "immediate", "-w", "stop"],
                    "pg_ctl stop",
                )
        if self._root:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = ""

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
