"""What the service tests share: one example service served for real on
127.0.0.1:0 with the envelope interceptors and an in-memory audit sink, and a
fixture that stops every server a test started."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import ParamSpec, TypeVar

import grpc
import pytest

import envelope_grpc
from envelope_grpc import EnvelopeConfig
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope
from services import _runtime
from tests.conftest import Collector

P = ParamSpec("P")
ServedT = TypeVar("ServedT", bound="Served")


class Served:
    """``service_list`` served with ``config`` plus a Collector among its sinks,
    and a channel to it. ``start`` registers extractors on ``config.extractors``:
    give each server its own config."""

    def __init__(
        self, service_list: Sequence[_runtime.Service], config: EnvelopeConfig | None = None
    ) -> None:
        self.collector = Collector()
        config = config if config is not None else EnvelopeConfig()
        self.config = dataclasses.replace(config, sinks=[*config.sinks, self.collector])
        self.running = _runtime.start(service_list, self.config)
        self.address = self.running.address
        self.channel = grpc.insecure_channel(self.address)

    def envelopes(self, count: int, *, exact: bool = True) -> list[ExecutionEnvelope]:
        """The envelopes reported once ``count`` have arrived: exactly ``count``
        of them, or (``exact=False``) the first ``count``; each checked valid."""
        found = self.collector.wait(count)
        if exact:
            assert len(found) == count, f"expected {count} envelopes, got {len(found)}"
        else:
            found = found[:count]
        for env in found:
            self.check(env)
        return found

    def check(self, env: ExecutionEnvelope) -> None:
        assert envelope_grpc.validate(env) == []

    def close(self) -> None:
        self.channel.close()
        self.running.stop(None)


class Servers:
    """``servers(make, *args)`` is ``make(*args)``, closed when the test ends."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack

    def __call__(self, make: Callable[P, ServedT], /, *args: P.args, **kwargs: P.kwargs) -> ServedT:
        served = make(*args, **kwargs)
        self.stack.callback(served.close)
        return served


@pytest.fixture
def servers() -> Iterator[Servers]:
    """Start servers with ``servers(make, ...)``; all are closed at the end."""
    with contextlib.ExitStack() as stack:
        yield Servers(stack)
