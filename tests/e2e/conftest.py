"""The end-to-end tests run real Phoenix (a ~850 MB install of its own) and
the whole demo: `make e2e` runs them, with ENVELOPE_GRPC_E2E=1. A plain
`pytest` run (and `make test`) leaves them out rather than skipping them."""

from __future__ import annotations

import os

if os.environ.get("ENVELOPE_GRPC_E2E") != "1":
    collect_ignore_glob = ["test_*.py"]
