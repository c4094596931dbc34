"""``python -m services.evaluation``: serve the evaluation service."""

from services._runtime import main
from services.evaluation import services

if __name__ == "__main__":
    raise SystemExit(main("evaluation", lambda args, provider: services()))
