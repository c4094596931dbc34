"""Generated code of services/evaluation/v1/evaluation.proto (`make proto`; never edit by hand)."""
