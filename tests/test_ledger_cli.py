"""`envelope-grpc ledger ...` against the ledger the demo fills, and its errors."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from envelope_grpc import from_json
from envelope_grpc._cli import main
from envelope_grpc.ledger import open_ledger
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope
from tests._envelopes import admitted, sample


@dataclasses.dataclass(frozen=True)
class Demo:
    url: str
    printed: str
    envelopes: list[ExecutionEnvelope]  # from the audit file, oldest first


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The demo run once, into a ledger of its own."""
    root = tmp_path_factory.mktemp("demo")
    url = f"sqlite:///{root / 'ledger.db'}"
    audit = root / "audit.jsonl"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["demo", "--audit", str(audit), "--ledger", url]) == 0
    envelopes = [from_json(line) for line in audit.read_text().splitlines()]
    envelopes.sort(key=lambda env: env.lifecycle.start_time.ToNanoseconds())
    assert len(envelopes) == 16
    return Demo(url, printed.getvalue(), envelopes)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def listed_ids(capsys: pytest.CaptureFixture[str], url: str, *filters: str) -> list[str]:
    status, out, err = cli(capsys, "ledger", "--ledger", url, "list", "--json", *filters)
    assert (status, err) == (0, "")
    return [from_json(line).envelope_id for line in out.splitlines()]


@pytest.mark.parametrize("command", [["list"], ["tail", "--once"]])
def test_a_reader_that_stops_early_ends_the_output_quietly(demo: Demo, command: list[str]) -> None:
    # As `envelope-grpc ledger list | head -1`: the pipe closes before the output is written.
    with subprocess.Popen(
        [sys.executable, "-m", "envelope_grpc._cli", "ledger", "--ledger", demo.url, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()
        assert (process.wait(timeout=60), process.stderr.read()) == (0, b"")


def test_list_shows_the_envelopes_the_demo_printed(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "ledger", "list", "--ledger", demo.url)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["started", "envelope", "parent"]
    assert len(lines) == 2 + 16
    demo_rows = demo.printed.splitlines()[2:18]
    assert [row.split()[2] for row in lines[2:]] == [row.split()[0] for row in demo_rows]
    for row, printed in zip(lines[2:], demo_rows, strict=True):
        assert row.split()[2:] == printed.split()  # the same cells after the start time
    assert f"and the ledger {demo.url}" in demo.printed


@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        (("--tenant", "globex"), lambda env: env.principal.tenant == "globex"),
        (("--principal", "bob"), lambda env: env.principal.subject == "bob"),
        (("--kind", "inference"), lambda env: env.execution.kind == 2),
        (("--kind", "agent_workflow"), lambda env: env.execution.kind == 5),
        (("--decision", "denied"), lambda env: env.decision.outcome == 5),
        (("--decision", "narrowed"), lambda env: env.decision.outcome == 2),
        (("--state", "rejected"), lambda env: env.lifecycle.state == 9),
        (
            ("--state", "completed", "--tenant", "acme"),
            lambda env: env.lifecycle.state == 6 and env.principal.tenant == "acme",
        ),
        (
            ("--method", "/services.agent.v1.AgentService/RunWorkflow"),
            lambda env: env.execution.target.name == "research",
        ),
        (("--since", "1h"), lambda env: True),
        (("--until", "1h"), lambda env: False),
    ],
)
def test_list_filters(
    demo: Demo, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...], keep: object
) -> None:
    expected = [env.envelope_id for env in demo.envelopes if keep(env)]  # type: ignore[operator]
    assert listed_ids(capsys, demo.url, *filters) == expected


def test_list_by_trace_time_and_limit(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    (run,) = [env for env in demo.envelopes if env.execution.target.name == "research"]
    family = [env.envelope_id for env in demo.envelopes if env.trace_id == run.trace_id]
    assert len(family) == 4  # the agent run and its three inference calls
    assert listed_ids(capsys, demo.url, "--trace", run.trace_id) == family
    fifth = demo.envelopes[4].lifecycle.start_time.ToDatetime(datetime.UTC)
    after = [env.envelope_id for env in demo.envelopes[4:]]
    assert listed_ids(capsys, demo.url, "--since", fifth.isoformat()) == after
    assert listed_ids(capsys, demo.url, "--until", fifth.isoformat()) == [
        e.envelope_id for e in demo.envelopes[:4]
    ]
    assert listed_ids(capsys, demo.url, "--limit", "3") == [env.envelope_id for env in demo.envelopes[-3:]]
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "list", "--tenant", "globex")
    assert status == 0
    assert len(out.splitlines()) == 2 + 4


def test_json_lines_are_the_audited_envelopes(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "list", "--json")
    assert status == 0
    assert [from_json(line) for line in out.splitlines()] == demo.envelopes
    assert all(json.loads(line)["schemaVersion"] == "1.0" for line in out.splitlines())


def test_show_draws_the_agent_runs_lineage_tree(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    (run,) = [env for env in demo.envelopes if env.execution.target.name == "research"]
    children = [env for env in demo.envelopes if env.lineage.parent_envelope_id == run.envelope_id]
    status, out, err = cli(capsys, "ledger", "--ledger", demo.url, "show", run.envelope_id[:8])
    assert (status, err) == (0, "")
    assert out.startswith(f"envelope   {run.envelope_id}\n")
    for needle in (
        "who        alice (user, jwt) · tenant acme",
        "unspecified → received  receiver",
        "normalized → admitted",
        "bound → completed",
        "dimension    requested  admission (admitted)  backend (admitted)",
        "limits  admitted  enforce",
        "rules permit-all-tenants",
        "outcome    OK",
    ):
        assert needle in out, needle
    tree = out.split("\nlineage\n", 1)[1].splitlines()
    assert len(tree) == 4
    assert tree[0].split() == [run.envelope_id[:8], "agent_workflow", "research", "completed", "◀"]
    branches = ["├──", "├──", "└──"]
    for line, child, branch in zip(tree[1:], children, branches, strict=True):
        assert line.split()[:2] == [branch, child.envelope_id[:8]]
        assert line.split()[2:] == ["inference", child.execution.target.name, "completed"]


def test_show_a_child_draws_the_whole_tree_and_marks_it(
    demo: Demo, capsys: pytest.CaptureFixture[str]
) -> None:
    child = next(env for env in demo.envelopes if env.lineage.parent_envelope_id)
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "show", child.envelope_id.upper())
    assert status == 0
    assert (
        f"parent {child.lineage.parent_envelope_id} · root {child.lineage.root_envelope_id} · depth 1" in out
    )
    tree = out.split("\nlineage\n", 1)[1].splitlines()
    assert tree[0].startswith(child.lineage.root_envelope_id[:8])
    (marked,) = [line for line in tree if line.endswith("◀")]
    assert child.envelope_id[:8] in marked
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "show", "--json", child.envelope_id)
    assert (status, from_json(out)) == (0, child)


def test_show_a_denial(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    denial = next(env for env in demo.envelopes if env.decision.reason_code == "LIMIT_EXCEEDED")
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "show", denial.envelope_id)
    assert status == 0
    words = " ".join(out.split())
    assert "denied by limits (LIMIT_EXCEEDED)" in words
    assert "normalized → rejected admission LIMIT_EXCEEDED" in words
    assert "outcome RESOURCE_EXHAUSTED LIMIT_EXCEEDED" in words


def test_stats_are_exact_for_a_hand_made_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'small.db'}"
    with open_ledger(url) as ledger:
        ledger.write(sample())
    status, out, err = cli(capsys, "ledger", "--ledger", url, "stats", "--json")
    assert (status, err) == (0, "")
    resource = ("tenant", "dimension", "envelopes", "requested", "granted", "narrowed", "widened")
    tenant = (
        *("tenant", "envelopes", "denied", "rejected", "granted"),
        *("narrowed", "narrowed_at_admission", "widened"),
    )
    assert json.loads(out) == {
        "envelopes": 6,
        "unfinished": 1,
        "dropped": 0,
        "resources": [
            dict(zip(resource, values, strict=True))
            for values in (
                ("acme", "accelerator_count", 1, 2, 2, 0, 0),
                ("acme", "memory_bytes", 1, 0, 8 << 30, 0, 1),
                ("acme", "tokens", 2, 5100, 4196, 1, 0),
                ("acme", "bytes", 1, 10, 10, 0, 0),
                ("globex", "accelerator_count", 1, 32, 0, 0, 0),
                ("globex", "tokens", 2, 30, 20, 0, 0),
            )
        ],
        "denials": [
            {"reason_code": "LIMIT_EXCEEDED", "stage": "admission", "count": 1},
            {"reason_code": "NO_CAPACITY", "stage": "backend", "count": 1},
        ],
        "tenants": [
            {**dict(zip(tenant, ("acme", 3, 0, 0, 3, 1, 1, 1), strict=True)), "narrowing_rate": 0.333333},
            {**dict(zip(tenant, ("globex", 3, 1, 1, 1, 0, 0, 0), strict=True)), "narrowing_rate": 0.0},
        ],
    }
    status, out, _ = cli(capsys, "ledger", "--ledger", url, "stats")
    assert status == 0
    rows = [line.split() for line in out.splitlines()]
    assert " ".join(rows[0]) == "6 envelopes · 2 tenants · 1 unfinished · 0 dropped by writers"
    assert ["acme", "tokens", "2", "5100", "4196", "1", "0"] in rows
    assert ["globex", "accelerator_count", "1", "32", "0", "0", "0"] in rows
    assert ["NO_CAPACITY", "backend", "1"] in rows
    assert ["acme", "3", "0", "0", "3", "1", "1", "1", "33.3%"] in rows
    status, out, _ = cli(capsys, "ledger", "--ledger", url, "stats", "--json", "--tenant", "globex")
    assert json.loads(out)["envelopes"] == 3


def test_stats_of_the_demo(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "stats", "--json")
    assert status == 0
    found = json.loads(out)
    assert (found["envelopes"], found["unfinished"], found["dropped"]) == (16, 0, 0)
    assert {(d["reason_code"], d["stage"]): d["count"] for d in found["denials"]} == {
        ("CEDAR_FORBIDDEN", "admission"): 2,
        ("LIMIT_EXCEEDED", "admission"): 1,
        ("VENDOR_MISMATCH", "backend"): 1,
    }
    globex_tokens = next(
        r for r in found["resources"] if (r["tenant"], r["dimension"]) == ("globex", "tokens")
    )
    assert (globex_tokens["requested"], globex_tokens["granted"], globex_tokens["narrowed"]) == (
        20128,
        128,
        2,
    )


def test_tail_once_prints_what_is_there(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "ledger", "--ledger", demo.url, "tail", "--once", "--json", "-n", "100")
    assert status == 0
    assert sorted(from_json(line).envelope_id for line in out.splitlines()) == sorted(
        env.envelope_id for env in demo.envelopes
    )
    status, out, _ = cli(
        capsys, "ledger", "--ledger", demo.url, "tail", "--once", "-n", "3", "--tenant", "globex"
    )
    lines = out.splitlines()
    assert status == 0
    assert lines[0].split()[:2] == ["started", "envelope"]
    assert len(lines) == 1 + 3
    assert all(" globex " in line for line in lines[1:])


def test_the_ledger_option_comes_from_the_environment(
    demo: Demo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENVELOPE_GRPC_LEDGER", demo.url)
    status, out, _ = cli(capsys, "ledger", "list", "--limit", "2")
    assert (status, len(out.splitlines())) == (0, 4)


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (("ledger",), 2, "required"),
        (("ledger", "list", "--bogus"), 2, "unrecognized arguments: --bogus"),
        (("ledger", "list", "--kind", "teleport"), 2, "invalid choice: 'teleport'"),
        (("ledger", "list", "--state", "done"), 2, "invalid choice: 'done'"),
        (("ledger", "list", "--since", "last tuesday"), 2, "not a time: 'last tuesday'"),
        (("ledger", "list", "--since", "999999d"), 2, "not a time this side of year 1: '999999d'"),
        (("ledger", "list", "--since", "9" * 20 + "w"), 2, "not a time this side of year 1"),
        (("ledger", "tail", "--interval", "inf"), 2, "at most 3600 seconds, not inf"),
        (("ledger", "tail", "--interval", "0"), 2, "more than 0"),
        (("ledger", "list", "--limit", "0"), 2, "must be at least 1"),
        (("ledger", "show"), 2, "required: ID"),
        (("ledger", "show", "zz"), 2, "not an envelope id: 'zz'"),
        (("ledger", "show", "0" * 32), 1, "no envelope 00000000"),
        (("ledger", "show", "ab"), 1, "ambiguous"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], status: int, message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with open_ledger(url) as ledger:
        ledger.write([admitted(envelope_id="ab" + "0" * 30), admitted(envelope_id="ab" + "1" * 30)])
    got, out, err = (
        cli(capsys, *argv[:1], "--ledger", url, *argv[1:]) if len(argv) > 1 else cli(capsys, *argv)
    )
    assert got == status
    assert message in err
    assert err.startswith("envelope-grpc")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///{tmp}/missing.db", "no ledger at"),
        ("sqlite:///{tmp}/no/such/dir/l.db", "no ledger at"),
        (
            "postgresql://nobody@127.0.0.1:1/ledger?connect_timeout=2",
            "cannot connect to postgresql://nobody@127.0.0.1:1",
        ),
        (
            "postgresql://nobody:secret@127.0.0.1:1/ledger?connect_timeout=2",
            "postgresql://nobody:***@127.0.0.1:1",
        ),
        (
            "postgresql://nobody@127.0.0.1:1/ledger?password=secret&connect_timeout=2",
            "postgresql://nobody@127.0.0.1:1/ledger?password=***&connect_timeout=2",
        ),
        ("mysql://x@y/z", "unsupported ledger URL"),
    ],
)
@pytest.mark.parametrize("command", ["list", "stats", "tail --once", "show abc"])
def test_missing_or_unreachable_ledgers_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, message: str, command: str
) -> None:
    status, out, err = cli(capsys, "ledger", "--ledger", url.format(tmp=tmp_path), *command.split())
    assert (status, out) == (1, "")
    assert message in err
    assert "secret" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "missing.db").exists()  # reading never creates a ledger


def test_the_demo_with_a_bad_ledger_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "audit.jsonl"
    status, out, err = cli(capsys, "demo", "--audit", str(audit), "--ledger", "sqlite:///no/such/dir/l.db")
    assert (status, out) == (1, "")
    assert err.startswith("envelope-grpc: cannot open sqlite:///no/such/dir/l.db")
    assert err.count("\n") == 1


def test_time_bounds_beyond_the_stored_range_are_its_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with open_ledger(url) as ledger:
        ledger.write([admitted()])
    for bounds in (("--until", "2300-01-01"), ("--since", "1600-01-01T00:00+00:00")):
        status, out, err = cli(capsys, "ledger", "--ledger", url, "list", *bounds)
        assert (status, err, len(out.splitlines())) == (0, "", 3)  # header, rule, the envelope


def test_what_callers_wrote_cannot_draw_rows_or_hide_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = admitted(tenant="acme\x1b[8m")
    env.execution.target.name = "m\nforged-row  alice  acme  deployment\x1b[8m"
    env.execution.target.attributes["path\n"] = "a\u202eb"
    url = f"sqlite:///{tmp_path / 'hostile.db'}"
    with open_ledger(url) as ledger:
        ledger.write([env])
    outputs = [
        cli(capsys, "ledger", "--ledger", url, *command)
        for command in (["list"], ["show", env.envelope_id], ["tail", "--once"], ["stats"])
    ]
    for status, out, err in outputs:
        assert (status, err) == (0, "")
        assert not any(c in out for c in "\x1b\u202e")
        assert "forged-row" not in out or "m\\nforged-row" in out
    (_, listed, _), (_, shown, _), (_, tailed, _), (_, stats, _) = outputs
    assert len(listed.splitlines()) == 3  # header, rule, one row
    assert len(tailed.splitlines()) == 2  # header, one row
    assert "m\\nforged-row  alice  acme  deployment\\x1b[8m" in shown
    assert "path\\n=a\\u202eb" in shown
    assert "acme\\x1b[8m" in stats
