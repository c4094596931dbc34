"""`python -m services.<name>` as a child process, for the tests of the
command line."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def python_m(service: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``python -m services.<service> *args --port 0`` from the
    repository root (without OTEL_* settings), wait up to 30 s for its
    "serving on" line, and yield the process and the address it serves on.
    On exit a process still alive is killed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{service}", *args, "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), f"{service} printed nothing within 30 s"
        line = process.stdout.readline()
        found = re.fullmatch(rf"{service} serving on (127\.0\.0\.1:\d+)\n", line)
        assert found, line
        yield process, found.group(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def stop_with_sigterm(process: subprocess.Popen[str], *, attempts: int = 3, wait: float = 5.0) -> int:
    """SIGTERM ``process`` and return its exit code, within attempts x wait
    seconds. The service polls for the signal every 0.5 s, so one SIGTERM
    should do; sending it again is insurance against a signal lost on the way."""
    for _ in range(attempts):
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    raise AssertionError(f"the service ignored {attempts} SIGTERMs")
