"""Generated code of services.deployment.v1 (from proto/services/deployment/v1)."""
