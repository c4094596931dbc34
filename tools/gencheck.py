"""Fail when the committed generated code differs from a fresh generation.

Usage: python tools/gencheck.py FRESH_DIR
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")
PACKAGES = ("envelope_grpc", "services")


def generated(root: pathlib.Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for package in PACKAGES:
        for pattern in PATTERNS:
            for path in (root / package).rglob(pattern):
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def main() -> int:
    fresh = generated(pathlib.Path(sys.argv[1]))
    committed = generated(ROOT)
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    for name in stale:
        print(f"generated code out of date: {name} (run `make proto`)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
