"""The ``envelope-grpc`` command.

Exit status: 0 on success, 1 when something is missing or fails (an unknown
envelope, a ledger that cannot be opened), 2 for bad arguments. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _UsageError(Exception):
    """Bad arguments: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as one line, to be printed by ``main``."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _when(text: str) -> datetime.datetime:
    """A time: ISO 8601 (naive means local time) or an age such as 15m, 2h, 3d."""
    age = _AGE.fullmatch(text.strip())
    try:
        if age:
            seconds = float(age.group(1)) * _SECONDS[age.group(2)]
            return datetime.datetime.now().astimezone() - datetime.timedelta(seconds=seconds)
        return datetime.datetime.fromisoformat(text.strip())
    except OverflowError:
        raise argparse.ArgumentTypeError(f"not a time this side of year 1: {text!r}") from None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use ISO 8601 such as 2026-11-22T08:00, or an age: 30s, 15m, 2h, 3d)"
        ) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, not {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _ledger_parser(commands: Any) -> None:
    from envelope_grpc.ledger import choices

    ledger_help = (
        "ledger URL: sqlite:///FILE or postgresql://USER@HOST:PORT/DB"
        " (default: $ENVELOPE_GRPC_LEDGER or sqlite:///envelopes.db)"
    )
    group = commands.add_parser("ledger", help="read the envelope ledger: tail, show, list, stats")
    group.add_argument("--ledger", default=None, metavar="URL", help=ledger_help)
    ledger = group.add_subparsers(dest="ledger_command", required=True, metavar="{tail,show,list,stats}")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = ledger.add_parser(name, help=text, description=text)
        # Also accepted after the subcommand; SUPPRESS keeps a value given before it.
        parser.add_argument("--ledger", default=argparse.SUPPRESS, metavar="URL", help=ledger_help)
        return parser

    def filters(parser: argparse.ArgumentParser, *, limit: bool = True) -> None:
        parser.add_argument("--tenant", help="only this tenant")
        parser.add_argument("--principal", help="only this principal subject")
        parser.add_argument("--kind", choices=choices("kind"), help="only this execution kind")
        parser.add_argument("--decision", choices=choices("decision"), help="only this admission outcome")
        parser.add_argument("--state", choices=choices("state"), help="only this lifecycle state")
        parser.add_argument("--method", help="only this full gRPC method, /package.Service/Method")
        parser.add_argument("--trace", metavar="TRACE_ID", help="only this trace id")
        parser.add_argument(
            "--since", type=_when, help="started at or after: ISO 8601 time or an age (15m, 2h, 3d)"
        )
        parser.add_argument("--until", type=_when, help="started before: ISO 8601 time or an age")
        if limit:
            parser.add_argument("--limit", type=_positive, help="only the N most recent")

    tail = command("tail", "print the last envelopes, then follow new and changed ones until Ctrl-C")
    filters(tail, limit=False)
    tail.add_argument(
        "-n", "--lines", type=int, default=20, help="envelopes to print first (default: %(default)s)"
    )
    tail.add_argument("--once", action="store_true", help="print what is there and exit")
    tail.add_argument(
        "--interval", type=_seconds, default=0.5, help="seconds between polls (default: %(default)s)"
    )
    tail.add_argument("--json", action="store_true", help="one proto3-JSON envelope per line")

    show = command("show", "one envelope: lifecycle, requested vs granted, decision, lineage tree")
    show.add_argument("id", metavar="ID", help="envelope id, or a prefix of it that only one id has")
    show.add_argument("--json", action="store_true", help="the envelope as proto3 JSON")

    listing = command("list", "envelopes as a table, oldest first")
    filters(listing)
    listing.add_argument("--json", action="store_true", help="one proto3-JSON envelope per line")

    stats = command("stats", "requested vs granted per tenant and dimension, denial reasons, narrowing rates")
    filters(stats)
    stats.add_argument("--json", action="store_true", help="the numbers as one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _Parser(prog="envelope-grpc", description="Execution envelopes for gRPC AI backends.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the example backend on loopback, drive a scripted mix of calls, print the envelopes"
    )
    demo.add_argument(
        "--audit", default="envelopes.jsonl", help="JSON-lines audit file (default: %(default)s)"
    )
    demo.add_argument(
        "--ledger",
        default=None,
        metavar="URL",
        help="envelope ledger (default: $ENVELOPE_GRPC_LEDGER, else envelopes.db next to the audit file)",
    )
    serve = commands.add_parser("serve", help="run the example backend until interrupted")
    serve.add_argument(
        "--audit", default="envelopes.jsonl", help="JSON-lines audit file (default: %(default)s)"
    )
    serve.add_argument("--root", default=None, help="directory of the data stores (default: a temporary one)")
    serve.add_argument(
        "--ledger",
        default=None,
        metavar="URL",
        help="envelope ledger (default: $ENVELOPE_GRPC_LEDGER, else envelopes.db)",
    )
    _ledger_parser(commands)
    from envelope_grpc.ledger import LedgerError

    try:
        args = parser.parse_args(argv)
        if args.command == "ledger":
            try:
                return _ledger(args, sys.stdout)
            except ValueError as error:  # a filter or an id the ledger refuses
                return _fail(f"envelope-grpc: {error}", 2)
        # The example backend lives outside the library: it is loaded only here.
        if args.command == "demo":
            demo_run = importlib.import_module("services._demo").run
            return int(demo_run(args.audit, sys.stdout, ledger=args.ledger))
        serve_run = importlib.import_module("services._serve").run
        return int(serve_run(args.audit, args.root, sys.stdout, ledger=args.ledger))
    except _UsageError as error:
        return _fail(str(error), 2)
    except BrokenPipeError:  # piped into a reader that stopped (head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, LedgerError) as error:
        return _fail(f"envelope-grpc: {error}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int) -> int:
    print(" ".join(message.split()), file=sys.stderr)  # one line, whatever the message holds
    return status


def _ledger(args: argparse.Namespace, out: IO[str]) -> int:
    from envelope_grpc import _ledger_render as render
    from envelope_grpc import to_json
    from envelope_grpc.ledger import Filters, open_ledger

    with open_ledger(args.ledger, create=False) as ledger:
        command = args.ledger_command
        if command == "show":
            env = ledger.get(args.id)
            if env is None:
                return _fail(f"envelope-grpc: no envelope {args.id} in {ledger.url}", 1)
            if args.json:
                out.write(to_json(env, indent=2) + "\n")
            else:
                render.show(env, ledger.lineage(env.envelope_id), out)
            return 0
        filters = Filters(
            tenant=args.tenant,
            principal=args.principal,
            kind=args.kind,
            decision=args.decision,
            state=args.state,
            method=args.method,
            trace_id=args.trace,
            since=args.since,
            until=args.until,
            limit=getattr(args, "limit", None),
        )
        if command == "list":
            found = ledger.list(filters)
            if args.json:
                out.writelines(to_json(env, indent=None) + "\n" for env in found)
            else:
                render.table(found, out)
            return 0
        if command == "stats":
            result = ledger.stats(filters)
            if args.json:
                out.write(json.dumps(result.as_dict(), indent=2) + "\n")
            else:
                render.stats(result, out)
            return 0
        return _tail(ledger, filters, args, out)


def _tail(ledger: Any, filters: Any, args: argparse.Namespace, out: IO[str]) -> int:
    from envelope_grpc import _ledger_render as render
    from envelope_grpc import to_json

    def emit(envelopes: Sequence[Any]) -> None:
        for env in envelopes:
            out.write(to_json(env, indent=None) if args.json else render.line(render.row(env)))
            out.write("\n")
        out.flush()

    found, cursor = ledger.recent(args.lines, filters) if args.lines > 0 else ([], ledger.cursor())
    if not args.json:
        out.write(render.line(render.HEADER) + "\n")
    emit(found)
    if args.once:
        return 0
    try:
        for env in ledger.tail(cursor, filters, interval=max(args.interval, 0.05)):
            emit([env])
        return 0
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
