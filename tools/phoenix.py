"""Phoenix (arize-phoenix), a real OTLP tracing backend with a web UI, run
on this machine for the demo, the end-to-end test and the screenshot.

    python tools/phoenix.py serve                # Phoenix alone, until Ctrl-C
    python tools/phoenix.py demo                 # Phoenix, the demo's traffic into it, then until Ctrl-C
    python tools/phoenix.py screenshot OUT.png   # the agent run's trace in Phoenix's UI, by headless Chromium

Phoenix runs from its own virtual environment (`make phoenix` makes
`.venv-phoenix`), with telemetry and external resources off, a temporary
working directory (its SQLite database) and free ports, bound to loopback
only. Its OTLP/gRPC receiver ignores PHOENIX_HOST and binds "[::]:PORT" (all
interfaces; phoenix/server/grpc_server.py, no setting changes it), so Phoenix
is started through a small bootstrap that rebinds that one address to
127.0.0.1 before Phoenix's own entry point runs; after start-up every socket
the Phoenix process holds is read from /proc and start() refuses to go on
if any of them listens on or talks to an address other than loopback.

Standard library only: it runs under any Python, normally the project's .venv.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
#: Phoenix's virtual environment: PHOENIX_VENV (relative to the repository), or .venv-phoenix.
VENV: Final = ROOT / os.environ.get("PHOENIX_VENV", ".venv-phoenix")
#: The project the demo's spans are filed under (services/_runtime.tracer_provider).
PROJECT: Final = "envelope-grpc"
#: Server spans the demo's traffic makes: one per envelope.
DEMO_ENVELOPES: Final = 16

# Runs in Phoenix's interpreter. Phoenix's gRPC receiver calls
# server.add_insecure_port(f"[::]:{port}") (or add_secure_port with TLS); both
# are rebound to loopback, and any other address stops Phoenix at start-up, so
# a Phoenix that changes how it binds is noticed rather than trusted.
_BOOTSTRAP: Final = r"""
import runpy, sys
import grpc.aio._server as aio_server

def _loopback(address):
    host, _, port = address.rpartition(":")
    if host != "[::]" or not port.isdigit():
        raise SystemExit(f"tools/phoenix.py: unexpected gRPC bind address {address!r}")
    return f"127.0.0.1:{port}"

_insecure = aio_server.Server.add_insecure_port
_secure = aio_server.Server.add_secure_port
aio_server.Server.add_insecure_port = lambda self, address: _insecure(self, _loopback(address))
aio_server.Server.add_secure_port = lambda self, address, creds: _secure(self, _loopback(address), creds)
sys.argv = ["phoenix", "serve"]
runpy.run_module("phoenix.server.main", run_name="__main__", alter_sys=True)
"""

#: Chromium's flags for a headless run that reaches nothing but the page.
CHROMIUM_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class Socket:
    """One TCP socket of a process, from /proc/net/tcp{,6}."""

    state: str  # "LISTEN", "ESTABLISHED", ...
    local: str
    local_port: int
    remote: str
    remote_port: int

    @property
    def loopback(self) -> bool:
        """Both ends on loopback (a listening socket's remote end is the unspecified address)."""
        return _is_loopback(self.local) and (self.state == "LISTEN" or _is_loopback(self.remote))


_TCP_STATES: Final = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def _descendants(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        tasks = Path(f"/proc/{pids[index]}/task")
        with contextlib.suppress(OSError):
            for task in tasks.iterdir():
                with contextlib.suppress(OSError):
                    pids.extend(int(child) for child in (task / "children").read_text().split())
        index += 1
    return pids


def sockets(pid: int) -> list[Socket]:
    """Every TCP socket held by process ``pid`` and its descendants."""
    inodes: set[str] = set()
    for each in _descendants(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{each}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found: list[Socket] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] not in inodes:
                    continue
                local, local_port = fields[1].split(":")
                remote, remote_port = fields[2].split(":")
                found.append(
                    Socket(
                        _TCP_STATES.get(fields[3], fields[3]),
                        _address(local),
                        int(local_port, 16),
                        _address(remote),
                        int(remote_port, 16),
                    )
                )
    return found


class PhoenixError(RuntimeError):
    """Phoenix did not start, stopped early, or bound beyond loopback."""


@dataclasses.dataclass
class Phoenix:
    """A running Phoenix on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    grpc_port: int
    workdir: Path

    @property
    def url(self) -> str:
        """The web UI, REST API (/v1), GraphQL (/graphql) and OTLP/HTTP (/v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def otlp_endpoint(self) -> str:
        """The OTLP/gRPC receiver, as OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> Path:
        """Phoenix's own output."""
        return self.workdir / "phoenix.log"

    def export_environment(self) -> dict[str, str]:
        """OTEL_* variables that send a process's spans here."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }

    def get(self, path: str, **query: str | int) -> Any:
        """GET a JSON resource of Phoenix's REST API."""
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    def graphql(self, query: str, **variables: Any) -> Any:
        """Run a GraphQL query; its ``data``."""
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if answer.get("errors"):
            raise PhoenixError(f"GraphQL: {answer['errors']}")
        return answer["data"]

    def spans(self, project: str = PROJECT) -> list[dict[str, Any]]:
        """Every span of ``project`` (REST, flat attributes), oldest first."""
        found: list[dict[str, Any]] = []
        query: dict[str, str | int] = {"limit": 1000, "sort": "start_time", "order": "asc"}
        while True:
            try:
                page = self.get(f"/v1/projects/{urllib.parse.quote(project)}/spans", **query)
            except urllib.error.HTTPError as error:
                if error.code == 404:  # no span has named the project yet
                    return []
                raise
            found.extend(page["data"])
            if not page.get("next_cursor"):
                return found
            query["cursor"] = page["next_cursor"]

    def wait_for_envelopes(
        self, count: int = DEMO_ENVELOPES, project: str = PROJECT, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """The project's spans once ``count`` of them carry an envelope and
        no more spans arrive (ingestion is asynchronous); bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        previous = -1
        while True:
            spans = self.spans(project)
            envelopes = sum("execution_envelope.id" in span["attributes"] for span in spans)
            if envelopes >= count and len(spans) == previous:
                return spans
            if time.monotonic() > deadline:
                raise PhoenixError(f"{envelopes} of {count} envelope spans after {timeout:.0f} s")
            previous = len(spans)
            time.sleep(0.5)

    def project_id(self, project: str = PROJECT) -> str:
        """The project's global id, as the UI's URLs use it."""
        for entry in self.get("/v1/projects", limit=1000)["data"]:
            if entry["name"] == project:
                return str(entry["id"])
        raise PhoenixError(f"no project {project!r}")

    def trace_url(self, trace_id: str, span_id: str | None = None, project: str = PROJECT) -> str:
        """The UI's page of one trace, with a span (its global id) selected."""
        url = f"{self.url}/projects/{self.project_id(project)}/traces/{trace_id}"
        return url + (f"?selectedSpanNodeId={span_id}" if span_id else "")

    def check_loopback(self) -> list[Socket]:
        """Phoenix's sockets; raises if any is not on loopback."""
        held = sockets(self.process.pid)
        outside = [each for each in held if not each.loopback]
        if outside:
            raise PhoenixError(f"Phoenix holds sockets beyond loopback: {outside}")
        return held

    def alive(self) -> bool:
        """Phoenix has not exited."""
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The end of Phoenix's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Phoenix shuts down cleanly), SIGKILL after ``timeout``; the working dir goes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def environment(port: int, grpc_port: int, workdir: Path) -> dict[str, str]:
    """Phoenix's environment: the caller's without any PHOENIX_* or OTEL_*, plus ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PHOENIX_", "OTEL_"))}
    env.update(
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(grpc_port),
        PHOENIX_WORKING_DIR=str(workdir),
        PHOENIX_TELEMETRY_ENABLED="false",
        PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",
        # No LLM assistant and no server-side bash tool: nothing here needs them.
        PHOENIX_DISABLE_AGENT_ASSISTANT="true",
        PHOENIX_AGENTS_DISABLE_BASH="true",
        PHOENIX_LOG_MIGRATIONS="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def start(venv: Path = VENV, *, port: int = 0, grpc_port: int = 0, timeout: float = 120.0) -> Phoenix:
    """Start Phoenix from ``venv`` and wait (at most ``timeout``) until it
    answers on HTTP and gRPC; ports 0 mean free ones."""
    python = venv.absolute() / "bin" / "python"  # not resolve(): the venv's python is a symlink
    if not python.exists():
        raise PhoenixError(f"no Phoenix in {venv}: run `make phoenix`")
    port = port or free_port()
    grpc_port = grpc_port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="phoenix-"))
    try:
        with open(workdir / "phoenix.log", "wb") as log:
            process = subprocess.Popen(
                [str(python), "-c", _BOOTSTRAP],
                env=environment(port, grpc_port, workdir),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the runner, which stops Phoenix cleanly
            )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    phoenix = Phoenix(process, port, grpc_port, workdir)
    try:
        _wait_ready(phoenix, timeout)
        phoenix.check_loopback()
    except BaseException:
        log_tail = phoenix.tail()
        phoenix.stop()
        if log_tail:
            print(f"--- Phoenix's log ---\n{log_tail}", file=sys.stderr)
        raise
    return phoenix


def _wait_ready(phoenix: Phoenix, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not phoenix.alive():
            raise PhoenixError(f"Phoenix exited with status {phoenix.process.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{phoenix.url}/healthz", timeout=2) as response:
                healthy = response.status == 200
            # The gRPC receiver starts before the HTTP server answers; check it all the same.
            with socket.create_connection(("127.0.0.1", phoenix.grpc_port), timeout=2):
                pass
            if healthy:
                return
        if time.monotonic() > deadline:
            raise PhoenixError(f"Phoenix not ready after {timeout:.0f} s")
        time.sleep(0.25)


@contextlib.contextmanager
def running(venv: Path = VENV, **options: Any) -> Iterator[Phoenix]:
    """Phoenix for the duration of a ``with`` block."""
    phoenix = start(venv, **options)
    try:
        yield phoenix
    finally:
        phoenix.stop()


def run_demo(
    phoenix: Phoenix, audit: Path, *, python: str = sys.executable, capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """`envelope-grpc demo` with its spans exported to ``phoenix``; raises if it fails."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(phoenix.export_environment())
    done = subprocess.run(
        [python, "-m", "envelope_grpc._cli", "demo", "--audit", str(audit)],
        env=env,
        cwd=ROOT,
        text=True,
        capture_output=capture,
        timeout=300,
    )
    if done.returncode != 0:
        said = f"\n{done.stdout}{done.stderr}" if capture else ""
        raise PhoenixError(f"envelope-grpc demo exited with status {done.returncode}{said}")
    return done


def agent_run(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent workflow's server span."""
    (run,) = (s for s in spans if s["attributes"].get("execution_envelope.kind") == "agent_workflow")
    return run


class DevTools:
    """Chromium driven over the DevTools protocol through --remote-debugging-pipe:
    NUL-terminated JSON messages on its fds 3 (in) and 4 (out), so no port opens."""

    def __init__(self, binary: str, profile: str) -> None:
        to_chromium, self._out = os.pipe()
        self._in, from_chromium = os.pipe()
        # Above 9, so bash's 3<& and 4>& below cannot collide with them (dash reads only fds 0-9).
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chromium, from_chromium)]
        for fd in (to_chromium, from_chromium):
            os.close(fd)
        script = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-'
        argv = [*CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", script, binary, *argv],
            pass_fds=ends,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self._id = 0
        self.session: str | None = None

    def send(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        """One command (to the attached page once there is one); its result."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._out, data) :]
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise PhoenixError(f"Chromium did not answer {method} in {timeout:.0f} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise PhoenixError("Chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise PhoenixError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> None:
        """Until ``expression`` is true in the page."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise PhoenixError(f"the page never showed: {expression}")
            time.sleep(0.25)

    def close(self) -> None:
        """Close the browser; kill it if it lingers."""
        with contextlib.suppress(PhoenixError, OSError):
            self.session = None
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._in)
        os.close(self._out)


# The span's "Attributes" tab: every attribute as one JSON document, nested by dots.
_TAB = "[...document.querySelectorAll('[role=tab]')].find(t => t.textContent.trim() == 'Attributes')"
_SHOWN = "document.body.innerText.includes('execution_envelope')"
# Its JSON view: full key names, nested by dots.
_JSON = "[...document.querySelectorAll('[role=tabpanel] button')].find(b => b.textContent.trim() == 'JSON')"


def screenshot(
    url: str, out: Path, *, chromium: str = "chromium", size: tuple[int, int] = (1680, 1800)
) -> None:
    """A PNG of a Phoenix trace page (``url``) with the selected span's
    Attributes tab open, taken by headless Chromium with a fresh profile."""
    binary = shutil.which(chromium)
    if binary is None:
        raise PhoenixError(f"no {chromium}: `make screenshot` installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = DevTools(binary, profile)
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            width, height = size
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            browser.send("Page.navigate", url=url)
            browser.wait_for(f"{_TAB} && {_SHOWN}")
            browser.evaluate(f"{_TAB}.click()")
            browser.wait_for(f"{_TAB}.getAttribute('aria-selected') == 'true' && {_JSON}")
            browser.evaluate(f"{_JSON}.click()")
            time.sleep(1.0)  # let the code view lay itself out
            png = browser.send("Page.captureScreenshot", format="png")["data"]
        finally:
            browser.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(png))


def _wait_for_interrupt(phoenix: Phoenix) -> int:
    stopped = False

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopped and phoenix.alive():
        time.sleep(0.5)
    return 0 if stopped else 1


def _listening(phoenix: Phoenix) -> str:
    held = phoenix.check_loopback()
    return ", ".join(sorted({f"{s.local}:{s.local_port}" for s in held if s.state == "LISTEN"}))


def main(argv: list[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="tools/phoenix.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=VENV, help="Phoenix's virtual environment")
    parser.add_argument(
        "--port", type=int, default=0, help="UI / REST / OTLP-HTTP port (default: a free one)"
    )
    parser.add_argument("--grpc-port", type=int, default=0, help="OTLP/gRPC port (default: a free one)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run Phoenix until Ctrl-C")
    commands.add_parser("demo", help="run Phoenix, send the demo's spans to it, keep it running until Ctrl-C")
    shot = commands.add_parser("screenshot", help="a PNG of the agent run's trace in Phoenix's UI")
    shot.add_argument("out", type=Path)
    shot.add_argument("--chromium", default="chromium")
    args = parser.parse_args(argv)

    began = time.monotonic()
    print("starting Phoenix ...", flush=True)
    phoenix = start(args.venv, port=args.port, grpc_port=args.grpc_port)
    try:
        print(
            f"Phoenix ready in {time.monotonic() - began:.1f} s; listening on {_listening(phoenix)} only",
            flush=True,
        )
        if args.command == "serve":
            print(f"\nPhoenix UI: {phoenix.url}\nOTEL_EXPORTER_OTLP_ENDPOINT={phoenix.otlp_endpoint}")
            print("Ctrl-C stops it.", flush=True)
            return _wait_for_interrupt(phoenix)
        with tempfile.TemporaryDirectory(prefix="envelopes-") as scratch:
            audit = Path(scratch) / "envelopes.jsonl"
            run_demo(phoenix, audit, capture=args.command == "screenshot")
        spans = phoenix.wait_for_envelopes()
        run = agent_run(spans)
        trace = phoenix.trace_url(run["context"]["trace_id"], run["id"])
        if args.command == "screenshot":
            screenshot(trace, args.out, chromium=args.chromium)
            print(f"{args.out}: {trace}")
            return 0
        print(f"\n{len(spans)} spans in Phoenix, project {PROJECT!r}.")
        print(f"Phoenix UI:     {phoenix.url}/projects/{phoenix.project_id()}/spans")
        print(f"the agent run:  {trace}")
        print(
            "Open a span and its Attributes tab for execution_envelope.*; Ctrl-C stops Phoenix.", flush=True
        )
        return _wait_for_interrupt(phoenix)
    finally:
        phoenix.stop()


if __name__ == "__main__":
    sys.exit(main())
