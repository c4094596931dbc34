"""A small annotated service of every RPC shape, for tests and benchmarks."""
