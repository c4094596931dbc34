"""End to end: the demo's traffic exported over OTLP/gRPC to a real Phoenix,
and the envelopes read back through Phoenix's REST API.

Phoenix runs from .venv-phoenix (`make phoenix`), on loopback only, started
by tools/phoenix.py; the demo runs as `envelope-grpc demo` in a subprocess,
exactly as a person runs it, with OTEL_EXPORTER_OTLP_ENDPOINT pointing at
Phoenix. Run with `make e2e`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("phoenix_runner", ROOT / "tools" / "phoenix.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


runner = _load_runner()

NS = "execution_envelope."
#: Attributes that differ on every run: ids and timings.
VARYING = frozenset({NS + "id", NS + "request_id", NS + "root_id", NS + "parent_id", NS + "lifecycle"})
#: Steps every admitted call makes: a span event only when they carry a reason.
PLAIN = frozenset({"received", "normalized", "admitted", "completed"})


@dataclasses.dataclass(frozen=True)
class Demo:
    phoenix: Any
    spans: list[dict[str, Any]]
    #: The demo's audit ledger: the last record of each envelope, by id.
    audit: dict[str, dict[str, Any]]
    seconds: float

    @property
    def envelopes(self) -> list[dict[str, Any]]:
        """The server spans, each carrying one envelope."""
        return [span for span in self.spans if NS + "id" in span["attributes"]]

    def one(self, **match: object) -> dict[str, Any]:
        """The one envelope span whose attributes (keys without the namespace) match."""
        found = [
            span
            for span in self.envelopes
            if all(
                span["attributes"].get(NS + key.replace("__", ".")) == value for key, value in match.items()
            )
        ]
        assert len(found) == 1, f"{len(found)} spans match {match}"
        return found[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    began = time.monotonic()
    with runner.running() as phoenix:
        audit_path = tmp_path_factory.mktemp("demo") / "envelopes.jsonl"
        done = runner.run_demo(phoenix, audit_path, capture=True)
        assert f"spans exported to {phoenix.otlp_endpoint}" in done.stdout
        spans = phoenix.wait_for_envelopes(runner.DEMO_ENVELOPES)
        audit: dict[str, dict[str, Any]] = {}
        for line in audit_path.read_text().splitlines():
            record = json.loads(line)
            audit[record["envelopeId"]] = record  # write-ahead: the last record is the final one
        yield Demo(phoenix, spans, audit, time.monotonic() - began)


def envelope(span: dict[str, Any]) -> dict[str, Any]:
    """The span's envelope attributes that are the same on every run, with
    the lifecycle's states (without their offsets) as ``lifecycle.states``."""
    found = {
        key: value for key, value in span["attributes"].items() if key.startswith(NS) and key not in VARYING
    }
    return found | {NS + "lifecycle.states": [state for state, _ in lifecycle(span)]}


def lifecycle(span: dict[str, Any]) -> list[tuple[str, int]]:
    """The span's lifecycle path: each state with its offset in microseconds."""
    steps = [step.split(":") for step in span["attributes"][NS + "lifecycle"].split(" ")]
    return [(state, int(offset)) for state, offset in steps]


def events(span: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The span's envelope events, in order."""
    return [(event["name"], event["attributes"]) for event in span["events"] if event["name"].startswith(NS)]


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0]
    return host in {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}


def test_phoenix_listens_and_talks_on_loopback_only(demo: Demo) -> None:
    pid = demo.phoenix.process.pid
    owned = f"pid={pid},"
    listening = [line.split() for line in _ss("-ltnp") if owned in line]
    assert sorted(int(fields[3].rpartition(":")[2]) for fields in listening) == sorted(
        [demo.phoenix.port, demo.phoenix.grpc_port]
    )
    assert [fields[3] for fields in listening if not _loopback(fields[3])] == []
    # Every other socket Phoenix holds (our own REST reads) has loopback at both ends.
    connected = [line.split() for line in _ss("-tanp") if owned in line and not line.startswith("LISTEN")]
    assert [f for f in connected if not (_loopback(f[3]) and _loopback(f[4]))] == []
    # The runner's own check (from /proc) sees the same listening ports.
    held = demo.phoenix.check_loopback()
    assert sorted(s.local_port for s in held if s.state == "LISTEN") == sorted(
        [demo.phoenix.port, demo.phoenix.grpc_port]
    )


def _ss(*options: str) -> list[str]:
    return subprocess.run(
        ["ss", "-H", *options], check=True, capture_output=True, text=True
    ).stdout.splitlines()


def test_every_envelope_reaches_phoenix_on_its_server_span(demo: Demo) -> None:
    spans = demo.envelopes
    assert len(spans) == runner.DEMO_ENVELOPES == len(demo.audit)
    by_span_id = {span["context"]["span_id"]: span for span in spans}
    for envelope_id, record in demo.audit.items():
        span = by_span_id[record["spanId"]]
        assert span["attributes"][NS + "id"] == envelope_id
        assert span["context"]["trace_id"] == record["traceId"]
        assert span["name"] == record["execution"]["method"]
    kinds = sorted(span["attributes"][NS + "kind"] for span in spans)
    assert kinds == sorted(
        ["deployment"] * 5 + ["inference"] * 6 + ["evaluation"] + ["data_movement"] * 3 + ["agent_workflow"]
    )


def test_denied_deployment_limit(demo: Demo) -> None:
    span = demo.one(target__name="llama-3-405b")
    assert envelope(span) == {
        NS + "kind": "deployment",
        NS + "target.type": "model",
        NS + "target.name": "llama-3-405b",
        NS + "target.version": "1",
        NS + "principal.subject": "ci-runner",
        NS + "principal.kind": "service",
        NS + "principal.tenant": "initech",
        NS + "principal.auth_method": "jwt",
        NS + "scope.region": "eu-west",
        NS + "requested.accelerator_count": 32,
        NS + "decision.outcome": "denied",
        NS + "decision.policy": "limits",
        NS + "decision.reason_code": "LIMIT_EXCEEDED",
        NS + "decision.mode": "enforce",
        NS + "state": "rejected",
        NS + "lifecycle.states": ["received", "normalized", "rejected"],
    }
    assert events(span) == [(NS + "rejected", {"actor": "admission", "reason": "LIMIT_EXCEEDED"})]
    assert span["status_code"] == "ERROR"
    assert span["status_message"] == (
        "LIMIT_EXCEEDED: accelerator_count 32 exceeds the limit of 16 for EXECUTION_KIND_DEPLOYMENT"
    )


def test_denied_deployment_cedar(demo: Demo) -> None:
    span = demo.one(target__name="support-bot")
    assert envelope(span) == {
        NS + "kind": "deployment",
        NS + "target.type": "model",
        NS + "target.name": "support-bot",
        NS + "target.version": "1",
        NS + "principal.subject": "bob",
        NS + "principal.kind": "user",
        NS + "principal.tenant": "globex",
        NS + "principal.project": "support",
        NS + "principal.auth_method": "jwt",
        NS + "scope.region": "us-east",
        NS + "requested.accelerator_count": 1,
        NS + "decision.outcome": "denied",
        NS + "decision.policy": "cedar",
        NS + "decision.reason_code": "CEDAR_FORBIDDEN",
        NS + "decision.mode": "enforce",
        NS + "state": "rejected",
        NS + "lifecycle.states": ["received", "normalized", "rejected"],
    }
    assert events(span) == [(NS + "rejected", {"actor": "admission", "reason": "CEDAR_FORBIDDEN"})]
    assert span["status_code"] == "ERROR"
    assert span["status_message"] == (
        "CEDAR_FORBIDDEN: forbidden by Cedar policy globex-may-not-deploy: globex has no deployment contract"
    )


def test_deployment_granted_and_bound_by_the_backend(demo: Demo) -> None:
    span = demo.one(target__name="llama-3-70b")
    assert envelope(span) == {
        NS + "kind": "deployment",
        NS + "target.type": "model",
        NS + "target.name": "llama-3-70b",
        NS + "target.version": "1",
        NS + "principal.subject": "alice",
        NS + "principal.kind": "user",
        NS + "principal.tenant": "acme",
        NS + "principal.project": "search",
        NS + "principal.auth_method": "jwt",
        NS + "scope.region": "eu-west",
        NS + "requested.accelerator_count": 4,
        NS + "requested.replicas_max": 3,
        NS + "decision.outcome": "admitted",
        NS + "decision.mode": "enforce",
        NS + "granted.accelerator_count": 4,
        NS + "granted.accelerator_type": "nvidia-h100",
        NS + "granted.accelerator_memory_bytes": 320 << 30,
        NS + "granted.memory_bytes": 280 << 30,
        NS + "granted.replicas_min": 1,
        NS + "granted.replicas_start": 1,
        NS + "granted.replicas_max": 2,
        NS + "binding.node": "gpu-h100-0",
        NS + "binding.endpoint": "10.0.2.10:8000",
        NS + "usage.replicas_started": 1,
        NS + "state": "completed",
        NS + "lifecycle.states": ["received", "normalized", "admitted", "granted", "bound", "completed"],
    }
    assert events(span) == [
        (NS + "granted", {"actor": "backend", "reason": "PLACEMENT_ADJUSTED"}),
        (NS + "bound", {"actor": "backend"}),
    ]
    assert span["status_code"] == "UNSET"


def test_inference_narrowed_by_admission_then_by_the_model(demo: Demo) -> None:
    span = demo.one(target__name="tiny-lm", requested__tokens=20000)
    assert envelope(span) == {
        NS + "kind": "inference",
        NS + "target.type": "model",
        NS + "target.name": "tiny-lm",
        NS + "principal.subject": "bob",
        NS + "principal.kind": "user",
        NS + "principal.tenant": "globex",
        NS + "principal.project": "support",
        NS + "principal.auth_method": "jwt",
        NS + "requested.tokens": 20000,
        NS + "requested.bytes": 27,
        NS + "decision.outcome": "narrowed",
        NS + "decision.policy": "limits",
        NS + "decision.reason_code": "LIMIT_NARROWED",
        NS + "decision.mode": "enforce",
        NS + "granted.tokens": 64,
        NS + "granted.bytes": 27,
        NS + "binding.node": "vm",
        NS + "binding.endpoint": "v2/models/tiny-lm/versions/1",
        NS + "usage.tokens": span["attributes"][NS + "usage.tokens"],  # what the model generated
        NS + "state": "completed",
        NS + "lifecycle.states": ["received", "normalized", "admitted", "granted", "bound", "completed"],
    }
    assert 0 < span["attributes"][NS + "usage.tokens"] <= 64
    assert events(span) == [
        (NS + "admitted", {"actor": "admission", "reason": "LIMIT_NARROWED"}),
        (NS + "granted", {"actor": "backend", "reason": "MODEL_MAX_TOKENS"}),
        (NS + "bound", {"actor": "backend"}),
    ]


def test_lifecycle_path_and_events_on_every_span(demo: Demo) -> None:
    for span in demo.envelopes:
        attributes = span["attributes"]
        states, offsets = zip(*lifecycle(span), strict=True)
        assert states[0] == "received"
        assert states[-1] == attributes[NS + "state"]
        assert offsets[0] == 0
        assert list(offsets) == sorted(offsets)
        # A span event for each step beyond the plain path, and for a plain step only with a reason.
        named = [name.removeprefix(NS) for name, _ in events(span)]
        assert [state for state in states if state not in PLAIN] == [n for n in named if n not in PLAIN]
        assert all(event["reason"] for name, event in events(span) if name.removeprefix(NS) in PLAIN)


def test_agent_run_tree(demo: Demo) -> None:
    run = demo.one(kind="agent_workflow")
    run_id = run["attributes"][NS + "id"]
    assert envelope(run) == {
        NS + "kind": "agent_workflow",
        NS + "target.type": "workflow",
        NS + "target.name": "research",
        NS + "principal.subject": "alice",
        NS + "principal.kind": "user",
        NS + "principal.tenant": "acme",
        NS + "principal.project": "search",
        NS + "principal.auth_method": "jwt",
        NS + "requested.tokens": 600,
        NS + "requested.concurrency": 3,
        NS + "decision.outcome": "admitted",
        NS + "decision.mode": "enforce",
        NS + "binding.node": "vm",
        NS + "binding.endpoint": run["attributes"][NS + "binding.endpoint"],
        NS + "usage.tokens": run["attributes"][NS + "usage.tokens"],
        NS + "state": "completed",
        NS + "lifecycle.states": ["received", "normalized", "admitted", "granted", "bound", "completed"],
    }
    assert re.fullmatch(r"127\.0\.0\.1:\d+", run["attributes"][NS + "binding.endpoint"])
    assert run["parent_id"] is None
    trace_id = run["context"]["trace_id"]

    children = [span for span in demo.envelopes if span["attributes"].get(NS + "parent_id") == run_id]
    assert len(children) == 3
    assert sorted(child["attributes"][NS + "target.name"] for child in children) == [
        "text-embedder",
        "tiny-lm",
        "tiny-lm",
    ]
    assert run["attributes"][NS + "usage.tokens"] == sum(
        c["attributes"][NS + "usage.tokens"] for c in children
    )
    trace = {
        span["context"]["span_id"]: span for span in demo.spans if span["context"]["trace_id"] == trace_id
    }
    # The run, its three client calls, and the three inference server spans: nothing else.
    assert len(trace) == 7
    for child in children:
        attributes = child["attributes"]
        assert child["context"]["trace_id"] == trace_id
        assert attributes[NS + "root_id"] == run_id
        assert attributes[NS + "depth"] == 1
        assert attributes[NS + "kind"] == "inference"
        # The agent sends its caller's token: each step is admitted as alice.
        assert attributes[NS + "principal.subject"] == "alice"
        assert attributes[NS + "principal.kind"] == "user"
        assert attributes[NS + "principal.tenant"] == "acme"
        assert attributes[NS + "principal.auth_method"] == "jwt"
        assert attributes[NS + "requested.tokens"] == 16
        assert attributes[NS + "decision.outcome"] == "admitted"
        assert attributes[NS + "state"] == "completed"
        assert attributes[NS + "id"] != run_id
        # In the span tree: inference server span <- the agent's client span <- the run's server span.
        client = trace[child["parent_id"]]
        assert client["name"] == child["name"] == "/inference.GRPCInferenceService/ModelInfer"
        assert NS + "id" not in client["attributes"]
        assert client["parent_id"] == run["context"]["span_id"]
    assert len({child["attributes"][NS + "id"] for child in children}) == 3


def test_the_ui_serves_the_agent_runs_trace(demo: Demo) -> None:
    run = runner.agent_run(demo.spans)
    url = demo.phoenix.trace_url(run["context"]["trace_id"], run["id"])
    assert url.startswith(f"{demo.phoenix.url}/projects/")
    query = """query ($id: ID!) { node(id: $id) { ... on Project { name traceCount } } }"""
    project = demo.phoenix.graphql(query, id=demo.phoenix.project_id())["node"]
    assert project == {
        "name": runner.PROJECT,
        "traceCount": 13,
    }  # 16 envelopes, 3 of them in the agent's trace


def test_e2e_duration(demo: Demo) -> None:
    # Phoenix's start (~10-15 s), the demo and the read-back, loosely bounded.
    assert demo.seconds < 240
