"""``python -m services.agent --inference HOST:PORT``: serve the agent service
until interrupted. ``--inference`` (default 127.0.0.1:8001, or the
AGENT_INFERENCE_ADDRESS variable) is parsed here; every other argument goes
to ``services._runtime.main``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from services._runtime import main
from services.agent import DEFAULT_INFERENCE_ADDRESS, services


def run(argv: Sequence[str] | None = None) -> int:
    """Parse --inference, then serve with the remaining arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--inference",
        default=os.environ.get("AGENT_INFERENCE_ADDRESS", DEFAULT_INFERENCE_ADDRESS),
        help="host:port of the inference service",
    )
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        default = args.inference
        print(f"agent option:\n  --inference HOST:PORT  the inference service (default: {default})\n")
    return main("agent", lambda: services(args.inference), rest)


if __name__ == "__main__":
    raise SystemExit(run())
