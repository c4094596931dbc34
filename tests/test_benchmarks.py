"""`make bench` runs every configuration of both flavours, checks what each
does, and measures its floor against an envelope that reports the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import _runner
from benchmarks._floor import ATTRIBUTES, differences
from benchmarks._service import CONFIGS
from envelope_grpc import _constants as k


def test_the_quick_benchmark_measures_every_configuration_of_both_flavours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert _runner.main(["--quick", "--json", str(out)]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["meta"]["problems"] == []
    assert sorted({(r["flavour"], r["config"]) for r in document["results"]}) == sorted(
        (flavour, config) for flavour in ("grpc", "grpc.aio") for config in CONFIGS
    )
    assert [summary["flavour"] for summary in document["summaries"]] == ["grpc", "grpc.aio"]
    for summary in document["summaries"]:
        for name in ("unary_cpu_overhead_pct", "floor_unary_cpu_overhead_pct"):
            assert isinstance(summary[name], float)
    printed = capsys.readouterr().out
    for flavour in ("grpc", "grpc.aio"):
        assert f"{flavour}: envelope overhead: " in printed
        assert f"{flavour}: floor overhead: " in printed


def test_the_floor_must_set_the_attributes_the_envelope_sets() -> None:
    envelope = {
        **ATTRIBUTES,
        k.ATTR_ID: "e1",
        k.ATTR_REQUEST_ID: "r1",
        k.ATTR_LIFECYCLE: "received:0 completed:90",
        "rpc.method": "Run",
    }
    floor = {**envelope, k.ATTR_ID: "e2", k.ATTR_LIFECYCLE: "received:0 completed:40", "rpc.method": "other"}
    assert differences(floor, envelope) == []

    del floor[k.ATTR_MODE]
    floor[k.ATTR_TENANT] = "globex"
    assert differences(floor, envelope) == [
        "execution_envelope.decision.mode: only the envelope sets it",
        "execution_envelope.principal.tenant: 'globex' against 'acme'",
    ]
    assert differences(None, envelope) == ["no span with envelope attributes from the floor"]
    assert differences(floor, None) == ["no span with envelope attributes from the envelope"]
