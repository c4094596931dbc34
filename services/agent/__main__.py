"""``python -m services.agent --inference HOST:PORT``: serve the agent service,
calling the inference service at HOST:PORT (default 127.0.0.1:8001, or the
AGENT_INFERENCE_ADDRESS variable)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from services._runtime import main
from services.agent import DEFAULT_INFERENCE_ADDRESS, services


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inference",
        metavar="HOST:PORT",
        default=os.environ.get("AGENT_INFERENCE_ADDRESS", DEFAULT_INFERENCE_ADDRESS),
        help="the inference service (default: %(default)s)",
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Serve the agent service with the given command line."""
    return main(
        "agent",
        lambda args, provider: services(args.inference, tracer_provider=provider),
        argv,
        options=_options,
    )


if __name__ == "__main__":
    raise SystemExit(run())
