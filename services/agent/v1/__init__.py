"""Generated code of services.agent.v1 (from proto/services/agent/v1)."""
