"""The command line: the demo backend end to end, and its errors."""

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
    assert len(envelopes) == 16
    assert [(v.rule_id, v.field) for env in envelopes for v in validate(env)] == []
    lines = printed.splitlines()
    assert lines[0].split() == [
        "envelope",
        "parent",
        "who",
        "tenant",
        "kind",
        "target",
        "requested",
        "granted",
        "decision",
        "state",
    ]
    assert len(lines) == 2 + 16 + 2
    assert {env.principal.subject for env in envelopes} >= {"alice", "bob", "ci-runner"}
    for needle in ("LIMIT_NARROWED", "LIMIT_EXCEEDED", "CEDAR_FORBIDDEN", "rejected (VENDOR_MISMATCH)"):
        assert needle in printed
    (run,) = [env for env in envelopes if env.execution.target.name == "research"]
    children = [env for env in envelopes if env.lineage.parent_envelope_id]
    assert len(children) == 3
    assert {env.lineage.parent_envelope_id for env in children} == {run.envelope_id}
    assert {env.trace_id for env in children} == {run.trace_id}
    assert f"16 envelopes written to {audit}" in printed


def test_unwritable_audit_path_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--audit", "/nonexistent/dir/audit.jsonl"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("envelope-grpc: ")
    assert error.count("\n") == 1


def test_serve_with_an_unwritable_audit_path_leaves_no_ledger_behind(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENVELOPE_GRPC_LEDGER", raising=False)
    assert main(["serve", "--audit", "/nonexistent/dir/audit.jsonl"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("envelope-grpc: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == []
