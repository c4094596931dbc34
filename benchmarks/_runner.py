"""Orchestration: start the servers, run every workload, report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc

from benchmarks import _client, _floor, _report, _server, _service
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
CONTROL_TIMEOUT = 60.0  # seconds for a server to start or answer a command


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure."""

    calls: int  # cap on calls per measured loop
    seconds: float  # cap on the time of a measured loop
    warmup_calls: int
    warmup_seconds: float
    rounds: int  # measured loops per configuration and workload, configurations interleaved
    concurrency: int
    messages: int  # stream messages per call
    flavours: tuple[str, ...]
    profile: Path | None  # directory for server profiles (timings are then inflated)


def parse(argv: Sequence[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Server CPU, throughput and latency of bare grpcio, grpcio + OpenTelemetry, "
        "OpenTelemetry + the floor (the envelope's span attributes and trailers alone), "
        "and OpenTelemetry + the envelope interceptor, for grpc and grpc.aio servers.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny loops, one round")
    parser.add_argument("--calls", type=int, help="cap on calls per measured loop (default 5000; quick 60)")
    parser.add_argument("--seconds", type=float, help="cap on seconds per measured loop (default 0.5)")
    parser.add_argument("--rounds", type=int, help="measured loops per configuration (default 4; quick 1)")
    parser.add_argument("--concurrency", type=int, help="calls in flight in concurrent mode (default 8)")
    parser.add_argument("--messages", type=int, help="stream messages per call (default 50; quick 8)")
    parser.add_argument("--flavour", choices=[*_service.FLAVOURS, "all"], default="all")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the servers' handler threads with cProfile into build/profile/ (inflates timings)",
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "build" / "bench.json", help="where to write results"
    )
    args = parser.parse_args(argv)
    quick = args.quick

    def given(value: Any, default: Any, smoke: Any) -> Any:
        if value is not None:
            return value
        return smoke if quick else default

    settings = Settings(
        calls=given(args.calls, 5000, 60),
        seconds=given(args.seconds, 0.5, 0.1),
        warmup_calls=given(None, 200, 10),
        warmup_seconds=given(None, 0.1, 0.05),
        rounds=given(args.rounds, 4, 1),
        concurrency=given(args.concurrency, 8, 4),
        messages=given(args.messages, 50, 8),
        flavours=_service.FLAVOURS if args.flavour == "all" else (args.flavour,),
        profile=ROOT / "build" / "profile" if args.profile else None,
    )
    if min(settings.calls, settings.rounds, settings.concurrency) < 1 or settings.seconds <= 0:
        parser.error("--calls, --seconds, --rounds and --concurrency must be positive")
    if settings.messages < 2:
        parser.error("--messages must be at least 2")
    return settings, args.json


class Server:
    """A server process of one flavour and configuration, and a client channel to it."""

    def __init__(self, context: Any, flavour: str, config: str, workers: int, profile: Path | None) -> None:
        self.flavour = flavour
        self.config = config
        self.conn, child = context.Pipe()
        self.profile = profile / f"{flavour}-{config}.txt" if profile else None
        self.process = context.Process(
            target=_server.main,
            args=(flavour, config, child, workers, str(self.profile) if self.profile else None),
            name=f"bench-{flavour}-{config}",
        )
        self.process.start()
        child.close()
        self.channel: grpc.Channel | None = None

    def connect(self) -> pb_grpc.ExecutionTestServiceStub:
        """Wait for the server to listen, open a channel, check the configuration."""
        tag, port = self._receive()
        if tag != "ready":
            raise RuntimeError(f"{self.process.name}: unexpected {tag!r}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=CONTROL_TIMEOUT)
        stub = pb_grpc.ExecutionTestServiceStub(self.channel)
        _, call = stub.Run.with_call(_service.run_request(), timeout=_client.CALL_TIMEOUT)
        enveloped = any(key == _service.ENVELOPE_TRAILER for key, _ in call.trailing_metadata() or ())
        if enveloped != (self.config in _service.ENVELOPED):
            raise RuntimeError(f"{self.process.name}: envelope trailer present={enveloped}; misconfigured")
        return stub

    def command(self, command: str) -> Any:
        self.conn.send(command)
        return self._receive()

    def _receive(self) -> Any:
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while not self.conn.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(f"{self.process.name} exited with code {self.process.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.process.name} did not answer within {CONTROL_TIMEOUT:.0f}s")
        return self.conn.recv()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("quit")
            self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def measure_flavour(
    flavour: str, settings: Settings, context: Any, found: dict[_report.Key, _report.Result]
) -> None:
    """Every workload against the configurations of one flavour, once the
    floor is seen to set the attributes the envelope sets.

    The servers run side by side; for each workload the configurations
    take turns, in a rotating order, for ``rounds`` rounds, so that drift in
    the machine's speed spreads evenly over them.
    """
    workers = max(16, 2 * settings.concurrency)
    if settings.profile:
        settings.profile.mkdir(parents=True, exist_ok=True)
    servers = {
        config: Server(context, flavour, config, workers, settings.profile) for config in _service.CONFIGS
    }
    try:
        stubs = {config: server.connect() for config, server in servers.items()}
        unlike = _floor.differences(servers["floor"].command("sample"), servers["envelope"].command("sample"))
        if unlike:
            raise RuntimeError(f"the floor does not report what the envelope does: {'; '.join(unlike)}")
        for workload in _client.workloads(settings.messages):
            callers = {config: workload.caller(stub) for config, stub in stubs.items()}
            for mode in _client.MODES:
                results = {
                    config: _report.Result(flavour, workload, mode, config) for config in _service.CONFIGS
                }
                for round_ in range(settings.rounds):
                    shift = round_ % len(_service.CONFIGS)
                    for config in _service.CONFIGS[shift:] + _service.CONFIGS[:shift]:
                        results[config].add(*_measure(servers[config], callers[config], mode, settings))
                for config, result in results.items():
                    found[(flavour, workload.key, mode, config)] = result
                print("\n".join(_report.table(found, results, settings.concurrency)), end="\n\n", flush=True)
    finally:
        for server in servers.values():
            server.close()


def _measure(server: Server, call: _client.Call, mode: str, settings: Settings) -> tuple[_client.Run, Any]:
    _client.drive(
        call,
        mode,
        concurrency=settings.concurrency,
        max_calls=settings.warmup_calls,
        max_seconds=settings.warmup_seconds,
    )
    if server.command("start") != "ok":
        raise RuntimeError(f"{server.process.name}: start refused")
    run = _client.drive(
        call, mode, concurrency=settings.concurrency, max_calls=settings.calls, max_seconds=settings.seconds
    )
    return run, server.command("stop")


def _meta(settings: Settings) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in (
        "grpcio",
        "protobuf",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-grpc",
        "envelope-grpc",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "settings": dataclasses.asdict(settings),
        "configs": dict(_service.LABELS),
        "notes": "server CPU = the server process's CPU time (all threads) over the measured loop, "
        "span flushes included; latencies are client-observed whole calls",
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse(argv)
    context = multiprocessing.get_context("spawn")
    print(
        f"envelope-grpc benchmark: {', '.join(settings.flavours)}; configurations: "
        f"{', '.join(_service.LABELS.values())}\n"
        f"per loop ≤{settings.calls} calls / ≤{settings.seconds}s, {settings.rounds} round(s), "
        f"{settings.concurrency} in flight when concurrent, {settings.messages} messages per stream; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n\n{_report.LEGEND}",
        flush=True,
    )
    started = time.perf_counter()
    found: dict[_report.Key, _report.Result] = {}
    summaries: list[tuple[list[str], dict[str, Any]]] = []
    for flavour in settings.flavours:
        measure_flavour(flavour, settings, context, found)
        summaries.append(_report.summary(flavour, found))
    print("Summary (ratios against OTel alone; CPU per unary call measured sequentially)")
    for lines, _ in summaries:
        print("\n".join(lines))
    problems = [p for r in found.values() for p in r.problems()]
    meta = _meta(settings) | {"elapsed_s": time.perf_counter() - started, "problems": problems}
    _report.write_json(json_path, meta, found, [data for _, data in summaries])
    print(f"\n{len(found)} measurements in {time.perf_counter() - started:.0f}s; results in {json_path}")
    if settings.profile:
        print(f"server profiles in {settings.profile} (CPU figures above are inflated by profiling)")
    if problems:
        print(f"{len(problems)} configuration problem(s), see the tables above", file=sys.stderr)
        return 1
    return 0
