"""Server-side overhead of the envelope interceptor, next to OpenTelemetry's.

``python -m benchmarks`` (``make bench``) runs, in one go, four server
configurations — bare grpcio, grpcio with OpenTelemetry's server interceptor,
OpenTelemetry followed by the floor (the least an envelope interceptor adds:
the envelope's span attributes and trailers alone, see _floor), and
OpenTelemetry followed by the envelope interceptor (one LimitsPolicy whose
limits never trigger) — for the ``grpc`` and ``grpc.aio`` flavours, over the
test service's unary ``Run``, server-streaming ``Watch`` and client-streaming
``Upload``, with one client calling back to back and with several calls in
flight. ``--quick`` is a smoke test; ``--help`` lists the knobs.

How it measures:

* Each server runs in its own spawned process; its CPU time (all threads:
  gRPC's, the handlers', the span processor's) is read at the start and end
  of each measured loop, over a Pipe. Spans are recorded by a real SDK
  TracerProvider with a BatchSpanProcessor, flushed at both ends, and dropped
  by a trivial exporter that only counts them.
* Clients are synchronous ``grpc`` stubs in the parent (threads for the
  concurrent mode). Every loop stops at a call count or a time budget.
* The four servers of a flavour run side by side; for each workload their
  loops are interleaved, in rotating order, for several short rounds, each
  after a warm-up. CPU per call and throughput are medians over rounds; the
  ``±`` column shows half the rounds' range, i.e. how noisy a number is.
* The cost of one more stream message is the difference between the
  N-message and the one-message stream, divided by N - 1.
* Every run checks that each configuration did what it claims (one span per
  call; envelope attributes and trailers only with the floor and the
  envelope) and exits 1 if not.

Results also go to build/bench.json. ``--profile`` writes cProfile statistics
of every server's handler threads to build/profile/ (timings then inflate).
"""
