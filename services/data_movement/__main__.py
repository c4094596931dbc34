"""``python -m services.data_movement [--root DIR]``: serve the data movement
service over the stores under DIR (default: a temporary directory)."""

import argparse

from services._runtime import main
from services.data_movement import services


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", default=None, help="directory holding the stores (default: a temporary one)"
    )


if __name__ == "__main__":
    raise SystemExit(main("data_movement", lambda args, provider: services(args.root), options=_options))
