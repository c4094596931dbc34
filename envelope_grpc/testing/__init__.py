"""Support for tests and benchmarks: a small annotated service of every RPC
shape (``v1``) and a throwaway PostgreSQL server (``postgres``)."""
