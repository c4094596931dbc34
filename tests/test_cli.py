"""The command line."""

from __future__ import annotations

import pathlib

import pytest

from envelope_grpc import from_json, validate
from envelope_grpc._cli import main


def test_demo_prints_the_envelopes_and_writes_the_audit_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "audit.jsonl"
    assert main(["demo", "--audit", str(audit)]) == 0
    printed = capsys.readouterr().out
    envelopes = [from_json(line) for line in audit.read_text().splitlines()]
    assert len(envelopes) == 11
    assert all(validate(env) == [] for env in envelopes)
    assert printed.splitlines()[0].split() == [
        "envelope",
        "parent",
        "tenant",
        "kind",
        "target",
        "requested",
        "granted",
        "decision",
        "state",
    ]
    assert "narrowed (LIMIT_NARROWED)" in printed
    assert "denied (LIMIT_EXCEEDED)" in printed
    assert "rejected (INSUFFICIENT_CAPACITY)" in printed
    children = [env for env in envelopes if env.lineage.parent_envelope_id]
    (agent,) = [env for env in envelopes if env.execution.target.name == "agent"]
    assert {env.lineage.parent_envelope_id for env in children} == {agent.envelope_id}
    assert f"11 envelopes written to {audit}" in printed


def test_demo_reports_an_unwritable_audit_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--audit", "/nonexistent/dir/audit.jsonl"]) == 1
    assert capsys.readouterr().err.startswith("envelope-grpc: ")
