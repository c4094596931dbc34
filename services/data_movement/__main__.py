"""`python -m services.data_movement [--root DIR]`: serve the data movement
service over the stores under DIR (default: a temporary directory)."""

import argparse

from services._runtime import main
from services.data_movement import services

parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--root", default=None)
known, rest = parser.parse_known_args()
raise SystemExit(main("data_movement", lambda: services(known.root), rest))
