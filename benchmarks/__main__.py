"""``python -m benchmarks``: see benchmarks/__init__.py and ``--help``."""

from __future__ import annotations

import sys

from benchmarks._runner import main

if __name__ == "__main__":
    sys.exit(main())
