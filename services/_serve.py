"""`envelope-grpc serve`: every example service on its own loopback port,
with the envelope interceptors and a JSON-lines audit sink, until SIGINT or
SIGTERM. Spans go to an OTLP backend when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import sys
from typing import IO

from envelope_grpc import EnvelopeConfig, JsonLinesSink, Sink
from envelope_grpc.ledger import LedgerSink
from services._backend import NAMES, start_backend
from services._runtime import tracer_provider, trusted_loopback, wait_for_stop


def run(
    audit_path: str, root: str | None = None, out: IO[str] = sys.stdout, *, ledger: str | None = None
) -> int:
    """Serve until interrupted; an exit status."""
    audit = JsonLinesSink(audit_path)
    try:
        recorder = LedgerSink(ledger)  # default: $ENVELOPE_GRPC_LEDGER, else envelopes.db
    except BaseException:
        audit.close()
        raise
    sinks: list[Sink] = [audit, recorder]
    provider = tracer_provider("envelope-grpc")
    try:
        backend = start_backend(
            lambda name: EnvelopeConfig(sinks=sinks, trust_peer=trusted_loopback), provider, root=root
        )
        try:
            for name in NAMES:
                out.write(f"{name:14s} {backend.address(name)}\n")
            out.write(f"audit: {audit_path}; ledger: {recorder.url}; stores: {backend.root}; Ctrl-C stops\n")
            out.flush()
            wait_for_stop()
        finally:
            backend.stop()
    finally:  # closing twice is harmless: the servers' dispatchers close the sinks too
        recorder.close()
        audit.close()
        provider.shutdown()
    return 0
