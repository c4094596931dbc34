"""A small but real AI backend built on envelope-grpc: deployment, inference,
evaluation, data movement and an agent workflow. Each service runs on its own
(`python -m services.<name>`) or all together (`envelope-grpc serve`)."""
