"""Generated code of the testing service (``proto/envelope_grpc/testing/v1``)."""
