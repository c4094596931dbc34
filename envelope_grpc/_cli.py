"""The ``envelope-grpc`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="envelope-grpc", description="Execution envelopes for gRPC AI backends."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="serve on loopback, drive a scripted mix of calls, print the envelopes"
    )
    demo.add_argument(
        "--audit", default="envelopes.jsonl", help="JSON-lines audit file (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from envelope_grpc import _demo

        try:
            return _demo.run(args.audit)
        except OSError as error:
            print(f"envelope-grpc: {error}", file=sys.stderr)
            return 1
    return 2  # pragma: no cover - argparse refuses unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
