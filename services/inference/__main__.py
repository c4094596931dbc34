"""``python -m services.inference``: serve the inference service."""

from services._runtime import main
from services.inference import services

if __name__ == "__main__":
    raise SystemExit(main("inference", lambda args, provider: services()))
