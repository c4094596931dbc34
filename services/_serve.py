"""`envelope-grpc serve`: every example service on its own loopback port,
with the envelope interceptors and a JSON-lines audit sink, until SIGINT or
SIGTERM. Spans go to an OTLP backend when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import os
import sys
from typing import IO

from envelope_grpc import EnvelopeConfig, JsonLinesSink, Sink
from envelope_grpc.ledger import DEFAULT_URL, ENV_VAR, LedgerSink
from services._backend import NAMES, start_backend
from services._runtime import tracer_provider, trusted_loopback, wait_for_stop


def run(
    audit_path: str, root: str | None = None, out: IO[str] = sys.stdout, *, ledger: str | None = None
) -> int:
    """Serve until interrupted; an exit status."""
    recorder = LedgerSink(ledger or os.environ.get(ENV_VAR) or DEFAULT_URL)
    sinks: list[Sink] = [JsonLinesSink(audit_path), recorder]
    provider = tracer_provider("envelope-grpc")
    backend = start_backend(
        lambda name: EnvelopeConfig(sinks=sinks, trust_peer=trusted_loopback), provider, root=root
    )
    for name in NAMES:
        out.write(f"{name:14s} {backend.address(name)}\n")
    out.write(f"audit: {audit_path}; ledger: {recorder.url}; stores: {backend.root}; Ctrl-C stops\n")
    out.flush()
    wait_for_stop()
    backend.stop()
    recorder.close()
    provider.shutdown()
    return 0
