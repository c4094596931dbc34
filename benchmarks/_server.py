"""The server process: one flavour, one configuration, driven over a Pipe.

Commands (each answered): ``"start"`` begins a measured phase, ``"stop"``
ends it and answers with the process's CPU time over the phase and the spans
exported during it, ``"sample"`` answers with the attributes of the first
span that carried envelope attributes (or None), ``"quit"`` stops the server.
Both ends flush the span processor, so batching and export work done for the
phase's calls lands in the phase.

With a profile path, every thread that runs handlers (the event loop, or the
pool's workers) is profiled with cProfile from its start, and the merged
statistics are written there when the server stops. Profiled CPU times are
inflated; profiles are for finding hot spots, not for the tables.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import resource
import time
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

import grpc
import grpc.aio

from benchmarks import _service
from envelope_grpc.testing.v1 import testing_pb2_grpc as pb_grpc

ADDRESS = "127.0.0.1:0"


class Controller:
    """Answers the parent's commands; measures the whole process's CPU time."""

    def __init__(self, provider: Any, exporter: _service.DropExporter) -> None:
        self.provider = provider
        self.exporter = exporter
        self.started: tuple[float, float, float, float] | None = None

    @staticmethod
    def _now() -> tuple[float, float, float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.process_time(), usage.ru_utime, usage.ru_stime, time.perf_counter()

    def handle(self, command: str) -> Any:
        if command == "sample":
            self.provider.force_flush()
            return self.exporter.sample
        if command == "start":
            self.provider.force_flush()
            self.exporter.reset()
            self.started = self._now()
            return "ok"
        if command == "stop":
            if self.started is None:
                raise RuntimeError("stop without start")
            self.provider.force_flush()
            cpu, user, system, wall = (b - a for a, b in zip(self.started, self._now(), strict=True))
            self.started = None
            return {
                "cpu_s": cpu,
                "user_s": user,
                "sys_s": system,
                "wall_s": wall,
                "spans": self.exporter.spans,
                "enveloped_spans": self.exporter.enveloped,
            }
        raise ValueError(f"unknown command {command!r}")


def main(flavour: str, config: str, conn: Connection, workers: int, profile_path: str | None = None) -> None:
    """Process entry point: serve until told to quit (or the parent goes away)."""
    provider, exporter = _service.tracer_provider()
    controller = Controller(provider, exporter)
    chain = _service.interceptors(flavour, config, provider)
    profiles: list[cProfile.Profile] | None = [] if profile_path else None
    try:
        if flavour == "grpc":
            _serve(conn, controller, chain, workers, profiles)
        else:
            if profiles is not None:
                _profile_thread(profiles)
            asyncio.run(_serve_aio(conn, controller, chain))
            if profiles:
                profiles[0].disable()
        if profile_path and profiles:
            _write_profile(profiles, profile_path, f"{flavour} · {_service.LABELS[config]}")
    finally:
        provider.shutdown()
        conn.close()


def _profile_thread(profiles: list[cProfile.Profile]) -> None:
    profile = cProfile.Profile()
    profiles.append(profile)
    profile.enable()


def _write_profile(profiles: list[cProfile.Profile], path: str, title: str) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    for profile in profiles[1:]:
        stats.add(profile)
    out.write(f"{title}: {len(profiles)} profiled thread(s)\n")
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)
    with open(path, "w", encoding="utf-8") as file:
        file.write(out.getvalue())


def _receive(conn: Connection) -> str:
    try:
        command: str = conn.recv()
    except EOFError:  # the parent died
        return "quit"
    return command


def _serve(
    conn: Connection,
    controller: Controller,
    chain: list[Any],
    workers: int,
    profiles: list[cProfile.Profile] | None,
) -> None:
    if profiles is None:
        pool = futures.ThreadPoolExecutor(max_workers=workers)
    else:  # each worker profiles itself from its start
        pool = futures.ThreadPoolExecutor(workers, initializer=_profile_thread, initargs=(profiles,))
    server = grpc.server(pool, interceptors=chain)
    pb_grpc.add_ExecutionTestServiceServicer_to_server(_service.SyncServicer(), server)
    port = server.add_insecure_port(ADDRESS)
    server.start()
    conn.send(("ready", port))
    try:
        while (command := _receive(conn)) != "quit":
            conn.send(controller.handle(command))
    finally:
        server.stop(None).wait()
        pool.shutdown(wait=True)  # no worker runs (or is profiled) any more


async def _serve_aio(conn: Connection, controller: Controller, chain: list[Any]) -> None:
    server = grpc.aio.server(interceptors=chain)
    pb_grpc.add_ExecutionTestServiceServicer_to_server(_service.AioServicer(), server)
    port = server.add_insecure_port(ADDRESS)
    await server.start()
    loop = asyncio.get_running_loop()
    conn.send(("ready", port))
    try:
        # Wait for commands off the event loop; answer on it.
        while (command := await loop.run_in_executor(None, _receive, conn)) != "quit":
            conn.send(controller.handle(command))
    finally:
        await server.stop(None)
