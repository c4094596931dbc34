"""`python -m services.evaluation`: serve the evaluation service."""

from services._runtime import main
from services.evaluation import services

raise SystemExit(main("evaluation", services))
