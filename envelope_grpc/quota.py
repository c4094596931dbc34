"""Per-tenant quotas: budgets taken at admission and given back when the call ends.

A ``QuotaPolicy`` is an admission policy (and a ``Releasing`` one) over a list
of ``Budget``\\ s. Each budget counts one resource dimension of the envelope's
*requested* resources, per tenant (``envelope.principal.tenant``; an empty
tenant counts as ``"anonymous"``):

- **concurrent** (``window=None``): the amount in use by calls that have not
  ended yet, e.g. accelerators per tenant. Taken at admission, given back in
  ``release`` when the call ends.
- **per window** (``window=seconds``): the amount used in a sliding window,
  e.g. tokens per 60 s. Taken at admission and *not* given back, except that
  ``release`` refunds what the call did not use when the handler recorded its
  actual usage (``outcome.usage.tokens`` or ``bytes_moved`` below the amount
  taken), and refunds all of it when admission refused the call after the
  quota was taken (a later policy denied it: nothing ran). Duration is never
  refunded by usage: ``usage.duration_ms`` is the call's own wall time, which
  says nothing of how long what it started (a deployment) runs.

Decisions, on purpose:

- The amount taken is the **requested** amount. A policy does not see what
  earlier policies narrowed the grant to, and the requested amount bounds
  every grant, so the count is conservative; usage refunds correct windowed
  budgets afterwards.
- Windows are **sliding window counters**: the count of the current fixed
  window plus the previous window's count weighted by how much of it the
  sliding window still overlaps. A burst at a window boundary cannot reach
  twice the limit, a counter is three numbers, and the estimate assumes the
  previous window's use was evenly spread.
- A budget for a named tenant **replaces** the every-tenant budget
  (``tenant=""``) of the same dimension, window and kind for that tenant: that
  is how one tenant gets a bigger or smaller allowance. Budgets that differ in
  window or kind all apply, each with its own counter.
- A take over several budgets is **all or nothing**. With ``narrow=True`` a
  request that does not fit is granted what is left (a ``Narrow`` with reason
  ``QUOTA_NARROWED``) when something is left in every budget it touches;
  otherwise it is denied with RESOURCE_EXHAUSTED / ``QUOTA_EXCEEDED``.
- Holdings are recorded per envelope id with a **lease**: holdings of a
  process that died without releasing expire after ``lease_ttl`` seconds. A
  call that runs longer than its lease loses its hold too, so choose a lease
  longer than the longest call.
- A dry-run ``QuotaPolicy`` still counts: it takes and releases like an
  enforcing one, so its recorded verdicts show who would be refused.

Stores implement the small ``QuotaStore`` protocol. ``MemoryQuotaStore`` (the
default) keeps counters in the process. ``RedisQuotaStore`` keeps them in
Redis, so replicas of a service share one budget; every take and release is
one Lua script (EVALSHA, loaded on first use), and errors reach the admission
seam, which fails closed (UNAVAILABLE / POLICY_ERROR) unless the policy fails
open. A Redis-backed policy does I/O, and says so (``policy.blocking``):
grpc.aio servers then admit and release its calls off the event loop. Give it
a time budget with ``policy.spec(budget_seconds=...)`` and give the client
short socket timeouts. ``release`` runs on the RPC path after the handler: it
is one short script call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc

from envelope_grpc._envelope import QUANTITY_FIELDS
from envelope_grpc._policy import Allow, Deny, Narrow, PolicySpec, Verdict
from envelope_grpc._telemetry import KIND_NAMES
from envelope_grpc._values import BASIS_EXHAUSTED, OUTCOME_DENIED
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope, ExecutionKind, ResourceDimension, Resources

if TYPE_CHECKING:
    import redis

__all__ = [
    "CALLS",
    "QUOTA_EXCEEDED",
    "QUOTA_NARROWED",
    "Budget",
    "Charge",
    "MemoryQuotaStore",
    "QuotaPolicy",
    "QuotaStore",
    "RedisQuotaStore",
    "TakeResult",
]

#: The pseudo-dimension of a budget that counts calls: every call takes 1.
CALLS: Final = ResourceDimension.RESOURCE_DIMENSION_UNSPECIFIED
#: Reason code of a denial for an exhausted budget.
QUOTA_EXCEEDED: Final = "QUOTA_EXCEEDED"
#: Reason code of a grant narrowed to what is left of a budget.
QUOTA_NARROWED: Final = "QUOTA_NARROWED"

_ANONYMOUS: Final = "anonymous"
_log = logging.getLogger("envelope_grpc")
# The usage field that tells how much of a windowed dimension a call really
# used (not duration: usage.duration_ms is the call's wall time).
_USAGE_FIELDS: Final[Mapping[int, Any]] = {
    ResourceDimension.RESOURCE_DIMENSION_TOKENS: "tokens",
    ResourceDimension.RESOURCE_DIMENSION_BYTES: "bytes_moved",
}
_NAME: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


# -- budgets and the store protocol ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """A per-tenant budget of one resource dimension.

    ``window=None`` counts the amount in use by calls that have not ended
    (given back when they end); ``window`` in seconds counts the amount used
    in a sliding window of that length. ``kind`` limits the budget to one
    execution kind (0: every kind); ``tenant`` to one tenant (empty: every
    tenant, each with its own count). ``dimension=CALLS`` counts calls.
    ``refund`` lets a windowed budget give back what a call did not use,
    according to the usage its handler recorded.
    """

    dimension: ResourceDimension.ValueType
    limit: int
    window: float | None = None
    kind: ExecutionKind.ValueType = ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    tenant: str = ""
    refund: bool = True
    #: This budget's counter name within a tenant, e.g.
    #: ``accelerator_count.concurrent.any`` or ``tokens.60000ms.inference``.
    counter: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dimension != CALLS and self.dimension not in QUANTITY_FIELDS:
            raise ValueError(f"a budget needs a quantity dimension or CALLS: {self.dimension}")
        if self.limit < 0:
            raise ValueError(f"a budget's limit must not be negative: {self.limit}")
        if self.window is not None and _window_ms(self.window) < 1:
            raise ValueError(f"a budget's window must be at least 1 ms: {self.window}")
        if self.kind not in ExecutionKind.values():
            raise ValueError(f"not an execution kind: {self.kind}")
        span = "concurrent" if self.window is None else f"{_window_ms(self.window)}ms"
        kind = KIND_NAMES[self.kind] if self.kind else "any"
        object.__setattr__(self, "counter", f"{self.what}.{span}.{kind}")  # every call names it

    @property
    def what(self) -> str:
        """The counted dimension: a Resources field name, or "calls"."""
        name: str = QUANTITY_FIELDS.get(self.dimension, "calls")
        return name

    def charge(self, amount: int) -> Charge:
        """A charge of ``amount`` against this budget."""
        return Charge(self.counter, amount, self.limit, self.window)


def _window_ms(window: float | None) -> int:
    """A window in whole milliseconds; 0 for none (a concurrent count)."""
    return 0 if window is None else round(window * 1000)


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    """One counter's part of a take: ``amount`` against ``limit``, concurrent
    (``window=None``) or per sliding window of ``window`` seconds."""

    counter: str
    amount: int
    limit: int
    window: float | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.counter):
            raise ValueError(f"a counter name must match {_NAME.pattern}: {self.counter!r}")
        if self.amount < 0 or self.limit < 0:
            raise ValueError(f"amount and limit must not be negative: {self}")
        if self.window is not None and _window_ms(self.window) < 1:
            raise ValueError(f"a window must be at least 1 ms: {self.window}")

    @property
    def window_ms(self) -> int:
        """The window in milliseconds; 0 for a concurrent charge."""
        return _window_ms(self.window)


@dataclasses.dataclass(frozen=True, slots=True)
class TakeResult:
    """Whether a take succeeded, and per charge what was already in use
    (concurrent) or used in the window (windowed) before it."""

    taken: bool
    used: tuple[int, ...]


class QuotaStore(Protocol):
    """The counters behind a QuotaPolicy.

    ``take`` is all or nothing, records what ``holder`` took with a lease of
    ``lease_ttl`` seconds, and raises ValueError when the holder already holds
    something. ``release`` gives back the holder's concurrent charges and
    refunds windowed ones down to ``used`` (amounts keyed by counter name);
    it is idempotent, and a no-op for a holder that holds nothing. ``usage``
    reads the counts without taking.
    """

    @property
    def blocking(self) -> bool:
        """Whether the store does I/O (admission must then leave the event loop)."""
        ...

    def take(
        self, tenant: str, holder: str, charges: Sequence[Charge], *, lease_ttl: float
    ) -> TakeResult: ...

    def release(
        self, tenant: str, holder: str, charges: Sequence[Charge], *, used: Mapping[str, int] | None = None
    ) -> None: ...

    def usage(self, tenant: str, charges: Sequence[Charge]) -> tuple[int, ...]: ...


def _check(holder: str, charges: Sequence[Charge]) -> None:
    if not _NAME.match(holder):
        raise ValueError(f"a holder must match {_NAME.pattern}: {holder!r}")
    names = [charge.counter for charge in charges]
    if len(set(names)) != len(names):
        raise ValueError(f"a take names a counter twice: {names}")


def _sliding(index: int, current: int, previous: int, window_ms: int, now_ms: int) -> int:
    # Computes exactly what the Lua script computes (IEEE doubles below 2**53).
    overlap = window_ms - (now_ms - index * window_ms)
    return current + math.floor(previous * overlap / window_ms)


# -- the in-process store ------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Leases:
    held: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # holder: amount, deadline
    total: int = 0

    def purge(self, now_ms: int) -> None:
        for holder in [holder for holder, (_, deadline) in self.held.items() if deadline <= now_ms]:
            self.drop(holder)

    def drop(self, holder: str) -> None:
        self.total -= self.held.pop(holder)[0]


@dataclasses.dataclass(slots=True)
class _Window:
    window_ms: int
    index: int = 0
    current: int = 0
    previous: int = 0

    def at(self, now_ms: int) -> tuple[int, int, int]:
        """(index, current, previous) as of ``now_ms``."""
        index = now_ms // self.window_ms
        if self.index == index:
            return index, self.current, self.previous
        if self.index == index - 1:
            return index, 0, self.current
        return index, 0, 0


@dataclasses.dataclass(slots=True)
class _Holding:
    deadline_ms: int
    records: dict[str, tuple[int, int | None]]  # counter: amount, window index (None: concurrent)


class MemoryQuotaStore:
    """Counters in this process, thread-safe: the default store.

    ``clock`` returns seconds (default ``time.monotonic``); tests pass a fake.
    """

    blocking: Final = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], _Leases] = {}
        self._windows: dict[tuple[str, str], _Window] = {}
        self._holdings: dict[tuple[str, str], _Holding] = {}
        self._next_sweep = 0

    def _used(self, tenant: str, charge: Charge, now: int) -> tuple[int, tuple[int, int, int] | None]:
        key = (tenant, charge.counter)
        if charge.window is None:
            leases = self._leases.get(key)
            if leases is None:
                return 0, None
            leases.purge(now)
            return leases.total, None
        window = self._windows.get(key)
        state = window.at(now) if window is not None else (now // charge.window_ms, 0, 0)
        return _sliding(*state, charge.window_ms, now), state

    def take(self, tenant: str, holder: str, charges: Sequence[Charge], *, lease_ttl: float) -> TakeResult:
        """Take every charge or none; see QuotaStore."""
        _check(holder, charges)
        lease_ms = max(1, round(lease_ttl * 1000))
        with self._lock:
            now = int(self._clock() * 1000)
            self._sweep(now)
            holding = self._holdings.get((tenant, holder))
            if holding is not None and holding.deadline_ms > now:
                raise ValueError(f"holder {holder} already holds quota of tenant {tenant!r}")
            found = [self._used(tenant, charge, now) for charge in charges]
            used = tuple(amount for amount, _ in found)
            if any(u + c.amount > c.limit for u, c in zip(used, charges, strict=True)):
                return TakeResult(False, used)
            records: dict[str, tuple[int, int | None]] = {}
            for charge, (_, state) in zip(charges, found, strict=True):
                key = (tenant, charge.counter)
                if state is None:
                    leases = self._leases.setdefault(key, _Leases())
                    leases.held[holder] = (charge.amount, now + lease_ms)
                    leases.total += charge.amount
                    records[charge.counter] = (charge.amount, None)
                else:
                    index, current, previous = state
                    self._windows[key] = _Window(charge.window_ms, index, current + charge.amount, previous)
                    records[charge.counter] = (charge.amount, index)
            self._holdings[(tenant, holder)] = _Holding(now + lease_ms, records)
            return TakeResult(True, used)

    def release(
        self, tenant: str, holder: str, charges: Sequence[Charge], *, used: Mapping[str, int] | None = None
    ) -> None:
        """Give back what ``holder`` took; see QuotaStore."""
        used = used or {}
        with self._lock:
            holding = self._holdings.pop((tenant, holder), None)
            if holding is None:
                return
            for counter, (amount, index) in holding.records.items():
                key = (tenant, counter)
                if index is None:
                    leases = self._leases.get(key)
                    if leases is not None and holder in leases.held:
                        leases.drop(holder)
                        if not leases.held:
                            del self._leases[key]
                    continue
                actual = used.get(counter)
                window = self._windows.get(key)
                if actual is None or actual >= amount or window is None:
                    continue
                if window.index == index:
                    window.current = max(0, window.current - (amount - actual))
                elif window.index == index + 1:
                    window.previous = max(0, window.previous - (amount - actual))

    def usage(self, tenant: str, charges: Sequence[Charge]) -> tuple[int, ...]:
        """The counts now, per charge (their amounts are ignored)."""
        with self._lock:
            now = int(self._clock() * 1000)
            return tuple(self._used(tenant, charge, now)[0] for charge in charges)

    def _sweep(self, now: int) -> None:
        # Drops what expired or went stale, at most once a second, so tenants
        # that went quiet and holders never released cost no memory.
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1000
        for key in [key for key, holding in self._holdings.items() if holding.deadline_ms <= now]:
            del self._holdings[key]
        for key, leases in list(self._leases.items()):
            leases.purge(now)
            if not leases.held:
                del self._leases[key]
        for key, window in list(self._windows.items()):
            if window.index < now // window.window_ms - 1:
                del self._windows[key]


# -- the Redis store -------------------------------------------------------------------------

# KEYS[1]: the holder's holdings hash; then two keys per charge: its counter and
# its lease set (used by concurrent charges only).
# ARGV: mode ("take" | "peek"), holder, now in ms (negative: the server's TIME),
# lease in ms, number of charges, then per charge: counter name, amount, limit,
# window in ms (0: concurrent).
# A concurrent counter is a hash of holder -> amount and "#" -> total, with a
# sorted set of holder -> lease deadline; expired leases are dropped before each
# count. A window counter is a hash of i (window index), c (its count) and p (the
# previous window's count). Numbers are written with %d because Lua's tostring
# turns 1e14 and above into exponent notation.
_TAKE_SCRIPT: Final = """
local mode, holder = ARGV[1], ARGV[2]
local now = tonumber(ARGV[3])
if now < 0 then
  if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes (Redis < 5)
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local lease, n = tonumber(ARGV[4]), tonumber(ARGV[5])
if mode == 'take' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
local used, plan, fits = {}, {}, 1
for i = 1, n do
  local a = 5 + (i - 1) * 4
  local amount, limit, window = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local counter, leases = KEYS[2 * i], KEYS[2 * i + 1]
  if window == 0 then
    for _, h in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
      local held = redis.call('HGET', counter, h)
      if held then
        redis.call('HDEL', counter, h)
        redis.call('HINCRBY', counter, '#', -tonumber(held))
      end
      redis.call('ZREM', leases, h)
    end
    used[i] = tonumber(redis.call('HGET', counter, '#') or '0')
  else
    local state = redis.call('HMGET', counter, 'i', 'c', 'p')
    local index = math.floor(now / window)
    local at, cur, prev = tonumber(state[1]), 0, 0
    if at == index then
      cur, prev = tonumber(state[2]) or 0, tonumber(state[3]) or 0
    elseif at == index - 1 then
      prev = tonumber(state[2]) or 0
    end
    plan[i] = {index, cur, prev}
    used[i] = cur + math.floor(prev * (window - (now - index * window)) / window)
  end
  if used[i] + amount > limit then fits = 0 end
end
local reply = {fits}
for i = 1, n do reply[i + 1] = used[i] end
if mode ~= 'take' or fits == 0 then return reply end
for i = 1, n do
  local a = 5 + (i - 1) * 4
  local name, amount, window = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 4])
  local counter, leases = KEYS[2 * i], KEYS[2 * i + 1]
  if window == 0 then
    redis.call('HSET', counter, holder, amount)
    redis.call('HINCRBY', counter, '#', amount)
    redis.call('ZADD', leases, string.format('%d', now + lease), holder)
    for _, key in ipairs({counter, leases}) do
      if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
    end
    redis.call('HSET', KEYS[1], name, 'c|' .. amount)
  else
    local p = plan[i]
    redis.call('HSET', counter, 'i', string.format('%d', p[1]),
      'c', string.format('%d', p[2] + tonumber(amount)), 'p', string.format('%d', p[3]))
    redis.call('PEXPIRE', counter, 2 * window)
    redis.call('HSET', KEYS[1], name, 'w|' .. amount .. '|' .. string.format('%d', p[1]))
  end
end
redis.call('PEXPIRE', KEYS[1], lease)
return reply
"""

# KEYS as for a take. ARGV: holder, number of charges, then per charge: counter
# name and the amount used (negative: not reported). Only the counters whose
# keys are declared are touched. Returns how many records were given back.
_RELEASE_SCRIPT: Final = """
local records = redis.call('HGETALL', KEYS[1])
if #records == 0 then return 0 end
redis.call('DEL', KEYS[1])
local holder, n = ARGV[1], tonumber(ARGV[2])
local known = {}
for i = 1, n do
  known[ARGV[1 + 2 * i]] = {KEYS[2 * i], KEYS[2 * i + 1], tonumber(ARGV[2 + 2 * i])}
end
local done = 0
for j = 1, #records, 2 do
  local k = known[records[j]]
  if k then
    local kind, amount, index = string.match(records[j + 1], '^(%a)|(%d+)|?(%d*)$')
    amount = tonumber(amount)
    if kind == 'c' then
      local held = redis.call('HGET', k[1], holder)
      if held then
        redis.call('HDEL', k[1], holder)
        redis.call('ZREM', k[2], holder)
        if redis.call('HINCRBY', k[1], '#', -tonumber(held)) <= 0 then
          redis.call('DEL', k[1], k[2])
        end
        done = done + 1
      end
    elseif k[3] >= 0 and k[3] < amount then
      local at, field = tonumber(redis.call('HGET', k[1], 'i')), nil
      if at == tonumber(index) then field = 'c' elseif at == tonumber(index) + 1 then field = 'p' end
      if field then
        local left = tonumber(redis.call('HGET', k[1], field) or '0') - (amount - k[3])
        redis.call('HSET', k[1], field, string.format('%d', math.max(0, left)))
        done = done + 1
      end
    end
  end
end
return done
"""


class RedisQuotaStore:
    """Counters in Redis, shared by every replica that uses the same server and
    ``prefix``.

    Each take, release and read is one Lua script, run with EVALSHA (and
    loaded again when the server lost it). Keys are ``{prefix}{<tenant>}:...``:
    the tenant is a Redis Cluster hash tag, so every key of one script lives
    in one slot. Time comes from the Redis server (``TIME``), the same for
    every replica, unless ``clock`` (seconds) is given. Redis errors
    propagate: give the client short ``socket_timeout`` and
    ``socket_connect_timeout`` and few retries, since admission waits for it.
    """

    blocking: Final = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "envelope-quota:",
        clock: Callable[[], float] | None = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"a prefix must not contain braces (they make the hash tag): {prefix!r}")
        self.client = client
        self.prefix = prefix
        self._clock = clock
        self._take = client.register_script(_TAKE_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)

    def _keys(self, tenant: str, holder: str, charges: Sequence[Charge]) -> list[str]:
        base = f"{self.prefix}{{{urllib.parse.quote(tenant, safe='')}}}:"
        keys = [f"{base}holder:{holder}"]
        for charge in charges:
            keys += [f"{base}{charge.counter}", f"{base}{charge.counter}:leases"]
        return keys

    def _run(
        self, mode: str, tenant: str, holder: str, charges: Sequence[Charge], lease_ms: int
    ) -> list[int]:
        now = -1 if self._clock is None else int(self._clock() * 1000)
        args: list[str | int] = [mode, holder, now, lease_ms, len(charges)]
        for charge in charges:
            args += [charge.counter, charge.amount, charge.limit, charge.window_ms]
        reply = self._take(keys=self._keys(tenant, holder, charges), args=args)
        return [int(value) for value in reply]

    def take(self, tenant: str, holder: str, charges: Sequence[Charge], *, lease_ttl: float) -> TakeResult:
        """Take every charge or none, atomically on the server; see QuotaStore."""
        _check(holder, charges)
        reply = self._run("take", tenant, holder, charges, max(1, round(lease_ttl * 1000)))
        if reply[0] < 0:
            raise ValueError(f"holder {holder} already holds quota of tenant {tenant!r}")
        return TakeResult(reply[0] == 1, tuple(reply[1:]))

    def release(
        self, tenant: str, holder: str, charges: Sequence[Charge], *, used: Mapping[str, int] | None = None
    ) -> None:
        """Give back what ``holder`` took; see QuotaStore. ``charges`` name the
        counters of the take (their keys are declared to the script)."""
        _check(holder, charges)
        used = used or {}
        args: list[str | int] = [holder, len(charges)]
        for charge in charges:
            args += [charge.counter, used.get(charge.counter, -1)]
        self._release(keys=self._keys(tenant, holder, charges), args=args)

    def usage(self, tenant: str, charges: Sequence[Charge]) -> tuple[int, ...]:
        """The counts now, per charge (their amounts are ignored)."""
        _check("usage", charges)
        return tuple(self._run("peek", tenant, "usage", charges, 1)[1:])


# -- the policy ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Hold:
    """What the policy took for one call, while the call runs."""

    tenant: str
    budgets: tuple[Budget, ...]
    charges: tuple[Charge, ...]
    started: float
    taking: bool = True  # the store has not answered yet
    abandoned: bool = False  # released while the take was still running
    used: Mapping[str, int] = dataclasses.field(default_factory=dict)


class QuotaPolicy:
    """An admission policy that takes per-tenant budgets and gives them back.

    A call that would exceed a budget is refused with RESOURCE_EXHAUSTED /
    ``QUOTA_EXCEEDED`` (denial basis EXHAUSTED) or, with ``narrow=True``,
    granted what is left (``QUOTA_NARROWED``) when something is. ``store``
    defaults to a ``MemoryQuotaStore``; holdings expire after ``lease_ttl``
    seconds when a call is never released. It is ``blocking`` when its store
    does I/O; ``policy.spec(...)`` adds a time budget, dry-run or fail-open.
    """

    def __init__(
        self,
        budgets: Sequence[Budget],
        *,
        store: QuotaStore | None = None,
        narrow: bool = False,
        lease_ttl: float = 3600.0,
        name: str = "quota",
    ) -> None:
        seen: set[tuple[str, str]] = set()
        for budget in budgets:
            if (budget.counter, budget.tenant) in seen:
                raise ValueError(f"two budgets for {budget.counter} of tenant {budget.tenant or '*'}")
            seen.add((budget.counter, budget.tenant))
        if lease_ttl <= 0:
            raise ValueError(f"a lease must be positive: {lease_ttl}")
        self.name = name
        self.budgets = tuple(budgets)
        self.store: QuotaStore = store if store is not None else MemoryQuotaStore()
        self.narrow = narrow
        self.lease_ttl = lease_ttl
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}
        self._admitted = 0

    def spec(
        self, *, budget_seconds: float | None = None, dry_run: bool = False, fail_open: bool | None = None
    ) -> PolicySpec:
        """A PolicySpec of this policy; ``budget_seconds`` bounds how long
        admission waits for the store."""
        return PolicySpec(self, name=self.name, dry_run=dry_run, fail_open=fail_open, budget=budget_seconds)

    @property
    def blocking(self) -> bool:
        """Whether the store does I/O (admission and release then leave a
        grpc.aio event loop)."""
        return self.store.blocking

    def budgets_for(self, tenant: str, kind: ExecutionKind.ValueType | None = None) -> tuple[Budget, ...]:
        """The budgets that count calls of ``tenant`` (of ``kind``; None: of
        any kind), a tenant's own budget replacing the every-tenant one."""
        chosen: dict[str, Budget] = {}
        for budget in self.budgets:
            if kind is not None and budget.kind and budget.kind != kind:
                continue
            if budget.tenant and budget.tenant != tenant:
                continue
            if budget.tenant or budget.counter not in chosen:
                chosen[budget.counter] = budget
        return tuple(chosen.values())

    def usage(self, tenant: str) -> dict[str, int]:
        """What ``tenant`` uses now, per counter name (``Budget.counter``)."""
        tenant = tenant or _ANONYMOUS
        charges = [budget.charge(0) for budget in self.budgets_for(tenant)]
        return dict(zip((c.counter for c in charges), self.store.usage(tenant, charges), strict=True))

    def __call__(self, envelope: ExecutionEnvelope, /) -> Verdict:
        tenant = envelope.principal.tenant or _ANONYMOUS
        requested = envelope.requested
        budgets: list[Budget] = []
        charges: list[Charge] = []
        for budget in self.budgets_for(tenant, envelope.execution.kind):
            field: Any = QUANTITY_FIELDS.get(budget.dimension)
            if field is None:  # CALLS: one per call
                amount = 1
            elif requested.HasField(field):
                amount = getattr(requested, field)
            else:
                continue
            if amount > 0:
                budgets.append(budget)
                charges.append(budget.charge(amount))
        if not charges:
            return Allow()
        holder = envelope.envelope_id
        hold = _Hold(tenant, tuple(budgets), tuple(charges), time.monotonic())
        with self._lock:
            if holder in self._holds:
                raise ValueError(f"envelope {holder} was already admitted by {self.name}")
            self._holds[holder] = hold
            self._prune()
        held = True  # the store may hold something for the call (also when it raised)
        try:
            verdict = self._take(hold, holder)
            held = not isinstance(verdict, Deny)
        finally:
            self._settle(hold, holder, held=held)
        return verdict

    def _take(self, hold: _Hold, holder: str) -> Verdict:
        result = self.store.take(hold.tenant, holder, hold.charges, lease_ttl=self.lease_ttl)
        if result.taken:
            return Allow()
        if not self.narrow:
            return self._deny(hold, hold.charges, result)
        caps: dict[int, int] = {}
        for budget, charge, used in zip(hold.budgets, hold.charges, result.used, strict=True):
            left = max(0, charge.limit - used)
            caps[budget.dimension] = min(caps.get(budget.dimension, left), left)
        if caps.get(CALLS, 1) < 1 or 0 in caps.values():  # nothing left, or calls cannot narrow
            return self._deny(hold, hold.charges, result)
        narrowed = tuple(
            dataclasses.replace(charge, amount=min(charge.amount, caps[budget.dimension]))
            for budget, charge in zip(hold.budgets, hold.charges, strict=True)
        )
        again = self.store.take(hold.tenant, holder, narrowed, lease_ttl=self.lease_ttl)
        if not again.taken:  # others took what was left in between
            return self._deny(hold, narrowed, again)
        caps_granted = Resources()
        notes: list[str] = []
        for budget, asked, cut, used in zip(hold.budgets, hold.charges, narrowed, result.used, strict=True):
            if cut.amount < asked.amount:
                setattr(caps_granted, budget.what, cut.amount)
                notes.append(
                    f"{self._what(budget)} narrowed from {asked.amount} to {cut.amount} "
                    f"({self._measure(budget, used)})"
                )
        hold.charges = narrowed
        return Narrow(
            caps_granted,
            QUOTA_NARROWED,
            f"quota of tenant {hold.tenant!r}: " + "; ".join(notes),
            tuple(budget.counter for budget in hold.budgets),
        )

    def _deny(self, hold: _Hold, charges: Sequence[Charge], result: TakeResult) -> Deny:
        for budget, charge, used in zip(hold.budgets, charges, result.used, strict=True):
            if used + charge.amount > charge.limit:
                return Deny(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    QUOTA_EXCEEDED,
                    f"quota exceeded for tenant {hold.tenant!r}: {self._what(budget)} "
                    f"{self._measure(budget, used)}, asked {charge.amount}",
                    BASIS_EXHAUSTED,
                    (budget.counter,),
                )
        raise AssertionError(f"the store refused a take that fits: {result}")

    @staticmethod
    def _what(budget: Budget) -> str:
        return f"{budget.what} of {KIND_NAMES[budget.kind]}" if budget.kind else budget.what

    @staticmethod
    def _measure(budget: Budget, used: int) -> str:
        if budget.window is None:
            return f"in use {used}/{budget.limit}"
        return f"used {used}/{budget.limit} per {budget.window:g} s"

    def _settle(self, hold: _Hold, holder: str, *, held: bool) -> None:
        with self._lock:
            hold.taking = False
            late = hold.abandoned
            if late or not held:
                self._holds.pop(holder, None)
        if late and held:
            # The take outlived its time budget and the call was released
            # meanwhile: no other release will come, so give back at once.
            try:
                self.store.release(hold.tenant, holder, hold.charges, used=hold.used)
            except Exception:
                _log.exception("%s failed to give back the late take of envelope %s", self.name, holder)

    def release(self, envelope: ExecutionEnvelope, /) -> None:
        """Give back what the call took: its concurrent amounts, and the unused
        part of windowed ones (all of it when admission refused the call).
        Idempotent; a no-op for a call that took nothing."""
        holder = envelope.envelope_id
        with self._lock:
            hold = self._holds.get(holder)
            if hold is None:
                return
            used = self._used_by(envelope, hold)
            if hold.taking:
                hold.abandoned, hold.used = True, used
                return
            del self._holds[holder]
        self.store.release(hold.tenant, holder, hold.charges, used=used)

    @staticmethod
    def _used_by(envelope: ExecutionEnvelope, hold: _Hold) -> dict[str, int]:
        windowed = [(b, c) for b, c in zip(hold.budgets, hold.charges, strict=True) if c.window is not None]
        if envelope.decision.outcome == OUTCOME_DENIED:  # refused at admission: nothing ran
            return {charge.counter: 0 for _, charge in windowed}
        usage = envelope.outcome.usage
        used: dict[str, int] = {}
        for budget, charge in windowed:
            field = _USAGE_FIELDS.get(budget.dimension)
            if budget.refund and field is not None and usage.HasField(field):
                used[charge.counter] = getattr(usage, field)
        return used

    def _prune(self) -> None:
        # Holds of calls never released (the policy called outside the
        # interceptors) are dropped once their lease is over.
        self._admitted += 1
        if self._admitted % 1024:
            return
        stale = time.monotonic() - self.lease_ttl
        for holder in [h for h, hold in self._holds.items() if hold.started < stale and not hold.taking]:
            del self._holds[holder]
