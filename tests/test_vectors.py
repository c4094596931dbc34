"""The conformance vectors in tests/vectors/ against the Python core."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest

from envelope_grpc._envelope import from_json, to_json, validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
PROTO = ROOT / "proto" / "envelope_grpc" / "v1" / "envelope.proto"

REPLAY_RULES = frozenset(
    {"lifecycle.broken_chain", "lifecycle.illegal_transition", "lifecycle.time_goes_back"}
)
NAME = re.compile(r"^\d{3}-[a-z0-9]+(-[a-z0-9]+)*\.json$")
PATHS = sorted(VECTORS.glob("*.json"))


def _load(path: pathlib.Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _expected(vector: dict[str, Any]) -> set[tuple[str, str]]:
    return {(v["ruleId"], v["field"]) for v in vector["violations"]}


def _cel_rule_ids() -> set[str]:
    return set(re.findall(r'^\s*id:\s*"([^"]+)"', PROTO.read_text(encoding="utf-8"), re.MULTILINE))


def _all_expected() -> set[tuple[str, str]]:
    return set().union(*(_expected(_load(p)) for p in PATHS))


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_vector_is_well_formed(path: pathlib.Path) -> None:
    assert NAME.match(path.name), path.name
    vector = _load(path)
    assert set(vector) == {"description", "valid", "violations", "envelope"}
    assert isinstance(vector["description"], str)
    assert vector["description"]
    assert vector["valid"] is (vector["violations"] == [])
    for v in vector["violations"]:
        assert set(v) == {"ruleId", "field"}
        assert isinstance(v["ruleId"], str)
        assert isinstance(v["field"], str)
    assert len(_expected(vector)) == len(vector["violations"]), "a violation is listed twice"
    assert isinstance(vector["envelope"], dict)
    # Readable on its own: 2-space indent, one trailing newline.
    assert path.read_text(encoding="utf-8") == json.dumps(vector, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_vector(path: pathlib.Path) -> None:
    vector = _load(path)
    env = from_json(json.dumps(vector["envelope"]))
    got = {(v.rule_id, v.field) for v in validate(env)}
    assert got == _expected(vector)


VALID = [p for p in PATHS if _load(p)["valid"]]


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_vector_round_trips(path: pathlib.Path) -> None:
    env = from_json(json.dumps(_load(path)["envelope"]))
    again = from_json(to_json(env))
    assert again == env
    assert again.SerializeToString(deterministic=True) == env.SerializeToString(deterministic=True)
    # The files hold canonical proto3 JSON: what to_json writes.
    assert json.loads(to_json(env)) == _load(path)["envelope"]


def test_proto_declares_the_rules_the_vectors_expect() -> None:
    ids = _cel_rule_ids()
    # Guards the parser itself: one distinct id per CEL rule declared in the proto.
    declared = PROTO.read_text(encoding="utf-8").count("(buf.validate.message).cel")
    assert len(ids) == declared >= 18
    assert "grant.differs_without_outcome" in ids
    assert "envelope.rejected_with_grant" in ids
    assert not ids & REPLAY_RULES


def test_vectors_cover_every_cel_rule_and_replay_rule() -> None:
    covered = {rule for rule, _ in _all_expected()}
    missing = (_cel_rule_ids() | REPLAY_RULES) - covered
    assert not missing, f"no vector breaks {sorted(missing)}"


def test_vectors_cover_the_important_field_rules() -> None:
    required = {
        ("string.pattern", "envelope_id"),
        ("string.pattern", "schema_version"),
        ("string.pattern", "request_id"),
        ("string.min_len", "request_id"),
        ("string.pattern", "trace_id"),
        ("string.pattern", "span_id"),
        ("string.pattern", "lineage.parent_envelope_id"),
        ("string.pattern", "lineage.root_envelope_id"),
        ("int32.gte_lte", "lineage.depth"),
        ("int64.gte", "requested.accelerator_count"),
        ("int64.gte", "grants[1].resources.memory_bytes"),
        ("int64.gte", "outcome.usage.tokens"),
        ("int32.gte_lte", "outcome.status_code"),
        ("enum.defined_only", "execution.kind"),
        ("enum.defined_only", "principal.kind"),
        ("enum.not_in", "grants[0].stage"),
        ("enum.not_in", "grants[0].outcome"),
        ("enum.not_in", "lifecycle.transitions[1].to"),
        ("required", "lifecycle"),
        ("required", "lifecycle.start_time"),
        ("required", "lifecycle.transitions[0].time"),
        ("repeated.min_items", "lifecycle.transitions"),
        ("repeated.unique", "flags"),
    }
    assert required - _all_expected() == set()


def test_required_scenarios_are_present() -> None:
    by_name = {p.stem: _load(p) for p in PATHS}
    differs = by_name["106-grant-count-differs-without-outcome"]
    assert _expected(differs) == {("grant.differs_without_outcome", ""), ("grant.narrowed_not_declared", "")}
    backend = differs["envelope"]["grants"][1]
    assert "outcome" not in backend
    assert "reason" not in backend
    assert "reasonCode" not in backend
    assert backend["resources"]["acceleratorCount"] != differs["envelope"]["requested"]["acceleratorCount"]
    rejected = by_name["120-envelope-rejected-with-backend-grant"]["envelope"]
    assert rejected["lifecycle"]["state"] == "LIFECYCLE_STATE_REJECTED"
    assert [g["stage"] for g in rejected["grants"]] == ["GRANT_STAGE_ADMISSION", "GRANT_STAGE_BACKEND"]


def test_there_are_enough_vectors() -> None:
    assert len(PATHS) >= 30
    assert len(VALID) >= 10
    assert len({p.name[:3] for p in PATHS}) == len(PATHS), "two vectors share a number"
