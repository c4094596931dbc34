"""What every example service shares: a grpc server with OpenTelemetry and
the envelope interceptors, gRPC health checking and reflection, telemetry
set up from the standard OTEL_* variables, and a `python -m` entry point."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

import envelope_grpc
from envelope_grpc import EnvelopeConfig


@dataclasses.dataclass(frozen=True)
class Service:
    """One gRPC service: its full name, how to add it to a server, the
    function extractors it needs for protos it does not own, and what to
    close on stop."""

    name: str
    register: Callable[[grpc.Server], None]
    extractors: Sequence[tuple[str, envelope_grpc.Extractor]] = ()
    close: Callable[[], None] | None = None


def trusted_loopback(peer: envelope_grpc.Peer) -> bool:
    """Trust envelopes from this machine's own services (loopback peers)."""
    return peer.address.startswith(("ipv4:127.", "ipv6:[::1]:"))


def tracer_provider(service_name: str) -> TracerProvider:
    """A tracer provider exporting over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT
    (or its traces variant) is set, over gRPC or HTTP as
    OTEL_EXPORTER_OTLP_PROTOCOL says; the other OTEL_* variables apply as
    usual, and OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over the
    defaults here (the service name, and the Phoenix project "envelope-grpc")."""
    detected = Resource.create()
    defaults: dict[str, str] = {}
    if "openinference.project.name" not in detected.attributes:
        defaults["openinference.project.name"] = "envelope-grpc"
    if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = service_name
    provider = TracerProvider(resource=detected.merge(Resource(defaults)))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    return provider


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        return Http()
    raise OSError(f"unsupported OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} (use grpc or http/protobuf)")


@dataclasses.dataclass
class Running:
    """A started server."""

    server: grpc.Server
    port: int
    interceptor: envelope_grpc.EnvelopeServerInterceptor
    services: Sequence[Service] = ()

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and flush the audit sinks."""
        self.halt(grace)
        self.interceptor.close()

    def halt(self, grace: float | None = None) -> None:
        """Stop serving and close the services; the audit sinks stay open."""
        self.server.stop(grace).wait()
        for service in self.services:
            if service.close is not None:
                service.close()


def start(
    services: Sequence[Service],
    config: EnvelopeConfig | None = None,
    *,
    provider: TracerProvider | None = None,
    port: int = 0,
    workers: int = 16,
) -> Running:
    """Serve ``services`` on 127.0.0.1:``port`` (0: any free port) with
    OpenTelemetry's and the envelope interceptors, health and reflection."""
    config = config or EnvelopeConfig(trust_peer=trusted_loopback)
    for service in services:
        for method, extractor in service.extractors:
            config.extractors.register(method, extractor)
    interceptors = envelope_grpc.server_interceptors(config, tracer_provider=provider)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors)
    status = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    for service in services:
        service.register(server)
        status.set(service.name, health_pb2.HealthCheckResponse.SERVING)
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    names = [service.name for service in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:  # grpcio raises where older releases returned 0
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    envelope = interceptors[-1]
    assert isinstance(envelope, envelope_grpc.EnvelopeServerInterceptor)
    return Running(server, bound, envelope, tuple(services))


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    while not stopped.wait(0.5):  # a signal may land on a grpc thread: poll, do not block forever
        pass


#: Builds a service's list from the parsed command line and the tracer provider.
Build = Callable[[argparse.Namespace, TracerProvider], Sequence[Service]]


def main(
    name: str,
    build: Build,
    argv: Sequence[str] | None = None,
    *,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """`python -m services.<name>`: serve until SIGINT or SIGTERM.

    ``options`` adds the service's own command-line options; ``build``
    receives them with the tracer provider, so downstream calls are traced.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}", description=f"The example {name} service."
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--audit", default="", help="JSON-lines audit file (default: none)")
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    sinks = [envelope_grpc.JsonLinesSink(args.audit)] if args.audit else []
    config = EnvelopeConfig(sinks=sinks, trust_peer=trusted_loopback)
    provider = tracer_provider(f"envelope-grpc-{name}")
    try:
        running = start(build(args, provider), config, provider=provider, port=args.port)
    except OSError as error:
        parser.exit(1, f"{parser.prog}: {error}\n")
    print(f"{name} serving on {running.address}", flush=True)
    wait_for_stop()
    running.stop(grace=2)
    provider.shutdown()
    return 0
