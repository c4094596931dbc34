"""What a ledger adds up to: requested vs granted per tenant and resource
dimension, denial reasons, narrowing rates.

Definitions (exact, so the numbers can be checked by hand):

* An envelope's *grant* is its last grant (the backend's final grant when it
  made one, else admission's), unless the envelope was REJECTED (denied at
  admission or refused by the backend): a rejected envelope is granted
  nothing. An envelope that is still running counts with its grant so far.
* Per tenant and quantity dimension: ``envelopes`` that requested or were
  granted the dimension; the sums of the ``requested`` and ``granted``
  values; how many granted envelopes got less than they asked in that
  dimension (``narrowed``: lower, or not granted at all) or more
  (``widened``: higher, or granted without being asked).
* Per tenant: ``envelopes``; ``denied`` at admission; ``rejected`` by the
  backend after admission; ``granted`` (holding a grant, per the above);
  among the granted, ``narrowed`` (final grant NARROWED or ADJUSTED: some
  dimension below the request), ``narrowed_at_admission`` (the admission
  decision was NARROWED or ADJUSTED) and ``widened`` (WIDENED or ADJUSTED);
  ``narrowing_rate`` = narrowed / granted.
* Denials: every REJECTED envelope, by reason code and stage (``admission``
  when the decision was DENIED, else ``backend``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import Any, Final

from envelope_grpc._envelope import QUANTITIES, REJECTED
from envelope_grpc._values import OUTCOME_ADJUSTED, OUTCOME_DENIED, OUTCOME_NARROWED, OUTCOME_WIDENED
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope, Resources

#: The quantity dimensions, in the contract's order.
# Typed Any: the generated stubs accept only literal field names.
DIMENSIONS: Final[tuple[Any, ...]] = tuple(QUANTITIES)
_NARROWED: Final = frozenset({OUTCOME_NARROWED, OUTCOME_ADJUSTED})
_WIDENED: Final = frozenset({OUTCOME_WIDENED, OUTCOME_ADJUSTED})


@dataclasses.dataclass(frozen=True, slots=True)
class DimensionTotals:
    """Requested vs granted for one tenant and one quantity dimension."""

    tenant: str
    dimension: str
    envelopes: int
    requested: int
    granted: int
    narrowed: int
    widened: int


@dataclasses.dataclass(frozen=True, slots=True)
class DenialCount:
    """How many envelopes were refused for one reason at one stage."""

    reason_code: str
    stage: str
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class TenantRates:
    """Admission and narrowing counts of one tenant."""

    tenant: str
    envelopes: int
    denied: int
    rejected: int
    granted: int
    narrowed: int
    narrowed_at_admission: int
    widened: int

    @property
    def narrowing_rate(self) -> float:
        """Narrowed / granted (0.0 when nothing was granted)."""
        return self.narrowed / self.granted if self.granted else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerStats:
    """What the matching envelopes add up to; see the module's definitions."""

    envelopes: int
    unfinished: int
    resources: tuple[DimensionTotals, ...]
    denials: tuple[DenialCount, ...]
    tenants: tuple[TenantRates, ...]
    dropped: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "envelopes": self.envelopes,
            "unfinished": self.unfinished,
            "dropped": self.dropped,
            "resources": [dataclasses.asdict(item) for item in self.resources],
            "denials": [dataclasses.asdict(item) for item in self.denials],
            "tenants": [
                {**dataclasses.asdict(item), "narrowing_rate": round(item.narrowing_rate, 6)}
                for item in self.tenants
            ],
        }


def _grant(env: ExecutionEnvelope) -> Resources | None:
    if env.lifecycle.state == REJECTED or not env.grants:
        return None
    return env.grants[-1].resources


#: TenantRates' counters, in order.
_RATES: Final = tuple(field.name for field in dataclasses.fields(TenantRates))[1:]


def compute(envelopes: Iterable[ExecutionEnvelope], dropped: int = 0) -> LedgerStats:
    """Add up ``envelopes``."""
    # per (tenant, dimension): envelopes, requested, granted, narrowed, widened
    totals: dict[tuple[str, str], list[int]] = {}
    tenants: dict[str, Counter[str]] = {}
    denials: Counter[tuple[str, str]] = Counter()
    count = unfinished = 0
    for env in envelopes:
        count += 1
        tenant = env.principal.tenant
        rates = tenants.get(tenant)
        if rates is None:
            rates = tenants[tenant] = Counter()
        rates["envelopes"] += 1
        state = env.lifecycle.state
        if not env.lifecycle.HasField("end_time"):
            unfinished += 1
        admission = env.decision.outcome
        if admission == OUTCOME_DENIED:
            rates["denied"] += 1
        if state == REJECTED:
            stage = "admission" if admission == OUTCOME_DENIED else "backend"
            if stage == "backend":
                rates["rejected"] += 1
            denials[(env.outcome.reason_code or env.decision.reason_code, stage)] += 1
        grant = _grant(env)
        if grant is not None:
            rates["granted"] += 1
            final = env.grants[-1].outcome
            rates["narrowed"] += final in _NARROWED
            rates["widened"] += final in _WIDENED
            rates["narrowed_at_admission"] += admission in _NARROWED
        requested = env.requested
        for name in DIMENSIONS:
            asked = requested.HasField(name)
            got = grant is not None and grant.HasField(name)
            if not (asked or got):
                continue
            entry = totals.get((tenant, name))
            if entry is None:
                entry = totals[(tenant, name)] = [0, 0, 0, 0, 0]
            entry[0] += 1
            asked_value = getattr(requested, name) if asked else 0
            got_value = getattr(grant, name) if got else 0
            entry[1] += asked_value
            entry[2] += got_value
            if grant is not None:
                if asked and (not got or got_value < asked_value):
                    entry[3] += 1
                elif got and (not asked or got_value > asked_value):
                    entry[4] += 1
    order = {name: index for index, name in enumerate(DIMENSIONS)}
    return LedgerStats(
        envelopes=count,
        unfinished=unfinished,
        resources=tuple(
            DimensionTotals(tenant, name, *values)
            for (tenant, name), values in sorted(totals.items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))
        ),
        denials=tuple(
            DenialCount(reason, stage, n)
            for (reason, stage), n in sorted(denials.items(), key=lambda item: (-item[1], item[0]))
        ),
        tenants=tuple(
            TenantRates(tenant, *(rates[name] for name in _RATES))
            for tenant, rates in sorted(tenants.items())
        ),
        dropped=dropped,
    )
