"""``python -m services.deployment``: serve the deployment service."""

from services._runtime import main
from services.deployment import services

if __name__ == "__main__":
    raise SystemExit(main("deployment", lambda args, provider: services()))
