"""The ``envelope-grpc`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="envelope-grpc", description="Execution envelopes for gRPC AI backends."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the example backend on loopback, drive a scripted mix of calls, print the envelopes"
    )
    demo.add_argument(
        "--audit", default="envelopes.jsonl", help="JSON-lines audit file (default: %(default)s)"
    )
    serve = commands.add_parser("serve", help="run the example backend until interrupted")
    serve.add_argument(
        "--audit", default="envelopes.jsonl", help="JSON-lines audit file (default: %(default)s)"
    )
    serve.add_argument("--root", default=None, help="directory of the data stores (default: a temporary one)")
    args = parser.parse_args(argv)
    # The example backend lives outside the library: it is loaded only here.
    try:
        if args.command == "demo":
            return int(importlib.import_module("services._demo").run(args.audit))
        return int(importlib.import_module("services._serve").run(args.audit, args.root))
    except OSError as error:
        print(f"envelope-grpc: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
