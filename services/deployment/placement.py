"""A small placement engine: model server replicas onto a configured inventory.

Pure and deterministic: no I/O, no clock, no randomness. The engine keeps the
allocations of every placed deployment (accelerator indexes, host memory and
the load-balancer port on one node) and frees them on ``release``. It is not
thread-safe: callers serialize ``place`` and ``release``.

What it decides for one ask:

* **grant as asked** when a node in the region has room for every replica;
* **narrow** the maximum (and starting) replicas to what fits when capacity
  is short but the minimum replicas fit (REPLICAS_NARROWED);
* **fill in** what the caller left unset: accelerator memory from the node's
  accelerators, host memory from the model's size or the engine's default
  (MEMORY_COMPUTED), and replica counts, accelerator count and type
  (DEFAULTS_APPLIED);
* **bind** to a node, accelerator indexes and an endpoint ``host:port``;
* **reject** with a reason code: INVALID_REPLICAS, INVALID_ACCELERATORS or
  INVALID_REQUEST for bad input; REGION_UNAVAILABLE, VENDOR_MISMATCH or
  PORT_IN_USE when no node can match; INSUFFICIENT_CAPACITY when nodes match
  but are too small or too full.

Capacity is reserved for the granted maximum replicas, so scaling up never
fails for lack of accelerators. All replicas of a deployment share one node,
behind one load-balancer port.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

GiB: Final = 1 << 30
#: The first load-balancer port handed out when the caller names none.
FIRST_PORT: Final = 8000
#: The engine assumed when the caller names none.
DEFAULT_ENGINE: Final = "vllm"
#: Host memory per replica, in GiB, when the model's size is not known.
ENGINE_HOST_MEMORY_GIB: Final[Mapping[str, int]] = {
    "vllm": 32,
    "tgi": 24,
    "triton": 16,
    "llama.cpp": 8,
}
FALLBACK_HOST_MEMORY_GIB: Final = 16
#: Bytes per parameter of served weights (bf16).
BYTES_PER_PARAMETER: Final = 2


class Refusal(enum.Enum):
    """What kind of refusal a PlacementError is; the service maps it to a
    gRPC status code."""

    #: The ask itself is malformed (INVALID_ARGUMENT).
    INVALID = "invalid"
    #: No node of the kind asked exists where asked (FAILED_PRECONDITION).
    PRECONDITION = "precondition"
    #: Matching nodes exist but have no room (RESOURCE_EXHAUSTED).
    EXHAUSTED = "exhausted"


class PlacementError(Exception):
    """The engine refuses an ask; ``reason_code`` is machine-readable."""

    def __init__(self, refusal: Refusal, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.reason_code = reason_code
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """One serving node of the inventory."""

    name: str
    region: str
    endpoint_host: str
    host_memory_gib: int
    accelerator_vendor: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0
    #: Memory of each accelerator, in GiB.
    accelerator_memory_gib: int = 0

    @property
    def cpu_only(self) -> bool:
        """Whether the node has no accelerators."""
        return self.accelerator_count == 0

    def __post_init__(self) -> None:
        if not self.name or not self.region or not self.endpoint_host:
            raise ValueError(f"a node needs a name, a region and an endpoint host: {self}")
        if self.host_memory_gib <= 0 or self.accelerator_count < 0:
            raise ValueError(f"a node needs host memory and a non-negative accelerator count: {self}")
        if self.accelerator_count and (not self.accelerator_type or self.accelerator_memory_gib <= 0):
            raise ValueError(f"a node with accelerators needs their type and memory: {self}")


@dataclasses.dataclass(frozen=True, slots=True)
class Inventory:
    """The nodes placement may use, in preference order."""

    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        names = [node.name for node in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")

    @property
    def regions(self) -> tuple[str, ...]:
        """Every region, in inventory order."""
        return tuple(dict.fromkeys(node.region for node in self.nodes))

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Inventory:
        """An inventory from ``{"nodes": [{"name": ..., "region": ..., ...}]}``
        whose node entries use the Node field names."""
        fields = {field.name for field in dataclasses.fields(Node)}
        nodes = []
        for entry in data.get("nodes", ()):
            unknown = set(entry) - fields
            if unknown:
                raise ValueError(f"unknown node fields: {sorted(unknown)}")
            nodes.append(Node(**entry))
        return cls(tuple(nodes))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Inventory:
        """An inventory from a JSON file (see ``from_mapping``)."""
        return cls.from_mapping(json.loads(pathlib.Path(path).read_text()))


#: The embedded inventory: two regions, an A100 node and a CPU-only node in
#: us-east, an H100 node in eu-west.
DEFAULT_INVENTORY: Final = Inventory(
    (
        Node(
            name="gpu-a100-0",
            region="us-east",
            endpoint_host="10.0.1.10",
            host_memory_gib=512,
            accelerator_vendor="nvidia",
            accelerator_type="nvidia-a100",
            accelerator_count=4,
            accelerator_memory_gib=80,
        ),
        Node(name="cpu-0", region="us-east", endpoint_host="10.0.1.20", host_memory_gib=256),
        Node(
            name="gpu-h100-0",
            region="eu-west",
            endpoint_host="10.0.2.10",
            host_memory_gib=1024,
            accelerator_vendor="nvidia",
            accelerator_type="nvidia-h100",
            accelerator_count=8,
            accelerator_memory_gib=80,
        ),
    )
)


@dataclasses.dataclass(frozen=True, slots=True)
class Quantities:
    """Resource quantities per replica (replica counts for the deployment);
    None is unset, which differs from zero."""

    accelerator_count: int | None = None
    accelerator_type: str = ""
    accelerator_memory_bytes: int | None = None
    memory_bytes: int | None = None
    replicas_min: int | None = None
    replicas_start: int | None = None
    replicas_max: int | None = None
    concurrency: int | None = None
    duration_ms: int | None = None


#: The numeric fields of Quantities.
QUANTITY_FIELDS: Final = tuple(
    field.name for field in dataclasses.fields(Quantities) if field.name != "accelerator_type"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Ask:
    """What a caller asks to deploy."""

    model: str
    resources: Quantities = Quantities()
    engine: str = ""
    region: str = ""
    force_cpu: bool = False
    port: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Adjustment:
    """One way the grant differs from the (bounded) ask."""

    reason_code: str
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """Where a deployment runs and what it was granted."""

    deployment_id: str
    node: Node
    accelerator_indexes: tuple[int, ...]
    port: int
    engine: str
    granted: Quantities
    adjustments: tuple[Adjustment, ...]

    @property
    def endpoint(self) -> str:
        """The load balancer's ``host:port``."""
        return f"{self.node.endpoint_host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Allocation:
    node: str
    accelerator_indexes: frozenset[int]
    memory_bytes: int
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Fit:
    """What one replica needs on one node, and how many fit there now."""

    node: Node
    accelerators: int
    accelerator_memory_bytes: int | None
    memory_bytes: int
    port: int
    replicas: int
    notes: tuple[Adjustment, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Unfit:
    """A node that cannot hold even one replica, and why."""

    node: Node
    why: str

    def __str__(self) -> str:
        return f"{self.node.name} cannot: {self.why}"


class _PortTaken(_Unfit):
    """A node whose asked load-balancer port is taken."""


_SIZE = re.compile(r"(?<![0-9a-z.])(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z0-9])")


def model_parameters_billions(model: str) -> float | None:
    """The parameter count a model id states, in billions: "llama-3-8b" is 8,
    "mixtral-8x7b" is 56; None when it states none."""
    found = _SIZE.search(model.lower())
    if found is None:
        return None
    experts = int(found.group(1)) if found.group(1) else 1
    return experts * float(found.group(2))


def host_memory_bytes(model: str, engine: str) -> tuple[int, str]:
    """Host memory per replica for ``model`` served by ``engine``: twice the
    size of its bf16 weights when the model id states its size, otherwise
    the engine's default. Returns bytes and how they were computed."""
    billions = model_parameters_billions(model)
    if billions is not None:
        weights_gib = math.ceil(billions * BYTES_PER_PARAMETER)
        return 2 * weights_gib * GiB, f"2 x {weights_gib} GiB of bf16 weights for {billions:g}B parameters"
    gib = ENGINE_HOST_MEMORY_GIB.get(engine.lower(), FALLBACK_HOST_MEMORY_GIB)
    return gib * GiB, f"the {engine} default of {gib} GiB"


def _gib(value: int) -> str:
    return f"{value / GiB:g} GiB"


def validate(ask: Ask) -> None:
    """Refuse a malformed ask with INVALID_REPLICAS, INVALID_ACCELERATORS or
    INVALID_REQUEST (Refusal.INVALID)."""

    def invalid(code: str, message: str) -> PlacementError:
        return PlacementError(Refusal.INVALID, code, message)

    q = ask.resources
    if not ask.model:
        raise invalid("INVALID_REQUEST", "a model id is required")
    replicas = (
        ("min_replicas", q.replicas_min),
        ("starting_replicas", q.replicas_start),
        ("max_replicas", q.replicas_max),
    )
    for name, value in replicas:
        if value is not None and value < 0:
            raise invalid("INVALID_REPLICAS", f"{name} must not be negative, got {value}")
    if q.replicas_max == 0:
        raise invalid("INVALID_REPLICAS", "max_replicas must be at least 1")
    for i, (low, lo) in enumerate(replicas):
        for high, hi in replicas[i + 1 :]:
            if lo is not None and hi is not None and lo > hi:
                raise invalid("INVALID_REPLICAS", f"{low} ({lo}) exceeds {high} ({hi})")
    if q.accelerator_count is not None and q.accelerator_count < 0:
        raise invalid(
            "INVALID_ACCELERATORS", f"accelerator_count must not be negative, got {q.accelerator_count}"
        )
    if q.accelerator_memory_bytes is not None and q.accelerator_memory_bytes < 0:
        raise invalid("INVALID_ACCELERATORS", "accelerator memory must not be negative")
    no_accelerators = ask.force_cpu or q.accelerator_count == 0
    if no_accelerators and (q.accelerator_count or q.accelerator_type or q.accelerator_memory_bytes):
        why = "force_cpu" if ask.force_cpu else "accelerator_count 0"
        raise invalid("INVALID_ACCELERATORS", f"{why} excludes accelerators, but accelerators were asked for")
    # A replica of no memory (and no accelerators) would fit anywhere, any number of times.
    if q.memory_bytes is not None and q.memory_bytes < 1:
        raise invalid("INVALID_REQUEST", "host memory per replica must be positive")
    if q.concurrency is not None and q.concurrency < 1:
        raise invalid("INVALID_REQUEST", f"concurrency per replica must be at least 1, got {q.concurrency}")
    if q.duration_ms is not None and q.duration_ms < 1:
        raise invalid("INVALID_REQUEST", "a lifetime must be positive")
    if ask.port is not None and not 1 <= ask.port <= 65535:
        raise invalid("INVALID_REQUEST", f"lb_port must be within 1..65535, got {ask.port}")


def bound(asked: Quantities, ceiling: Quantities | None) -> tuple[Quantities, Quantities]:
    """The ask within ``ceiling`` (e.g. an admission grant): each dimension
    set in both is the lower of the two, a ceiling type replaces the asked
    one. Returns the bounded ask and the caps that apply to values the engine
    fills in (ceiling dimensions the caller left unset)."""
    if ceiling is None:
        return asked, Quantities()
    values: dict[str, Any] = {}
    caps: dict[str, Any] = {}
    for name in QUANTITY_FIELDS:
        mine, limit = getattr(asked, name), getattr(ceiling, name)
        if mine is not None:
            values[name] = mine if limit is None else min(mine, limit)
        elif limit is not None:
            caps[name] = limit
    values["accelerator_type"] = ceiling.accelerator_type or asked.accelerator_type
    return Quantities(**values), Quantities(**caps)


def _capped(value: int, cap: int | None) -> int:
    return value if cap is None else min(value, cap)


class PlacementEngine:
    """Places deployments onto an inventory and tracks their allocations."""

    def __init__(self, inventory: Inventory = DEFAULT_INVENTORY) -> None:
        self.inventory = inventory
        self._allocations: dict[str, _Allocation] = {}

    # -- state -------------------------------------------------------------------------

    def allocations(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every live deployment: its node and accelerator indexes."""
        return {
            key: (found.node, tuple(sorted(found.accelerator_indexes)))
            for key, found in self._allocations.items()
        }

    def free_accelerators(self, node: str) -> tuple[int, ...]:
        """The free accelerator indexes of ``node``, ascending."""
        used = self._used(node)
        return tuple(i for i in range(self.inventory.node(node).accelerator_count) if i not in used)

    def free_memory_bytes(self, node: str) -> int:
        """The host memory of ``node`` not reserved by any deployment."""
        reserved = sum(a.memory_bytes for a in self._allocations.values() if a.node == node)
        return self.inventory.node(node).host_memory_gib * GiB - reserved

    def _used(self, node: str) -> set[int]:
        used: set[int] = set()
        for found in self._allocations.values():
            if found.node == node:
                used |= found.accelerator_indexes
        return used

    def _ports(self, node: str) -> set[int]:
        return {a.port for a in self._allocations.values() if a.node == node}

    def release(self, deployment_id: str) -> bool:
        """Free a deployment's accelerators, memory and port; False when it
        holds none."""
        return self._allocations.pop(deployment_id, None) is not None

    # -- placing -----------------------------------------------------------------------

    def place(self, deployment_id: str, ask: Ask, ceiling: Quantities | None = None) -> Placement:
        """Place ``ask`` within ``ceiling`` and reserve what it is granted.

        Raises PlacementError with a reason code when it cannot be placed.
        """
        if deployment_id in self._allocations:
            raise ValueError(f"deployment {deployment_id} is already placed")
        validate(ask)
        asked, caps = bound(ask.resources, ceiling)
        notes: list[Adjustment] = []
        low, start, most = self._replicas(asked, caps, notes)
        cpu = ask.force_cpu or asked.accelerator_count == 0 or caps.accelerator_count == 0
        candidates = self._candidates(ask, asked, cpu)
        engine = ask.engine or DEFAULT_ENGINE
        fits = [self._fit(node, ask, asked, caps, engine, cpu, most) for node in candidates]
        possible = [fit for fit in fits if isinstance(fit, _Fit)]
        if not possible:
            reasons = "; ".join(str(fit) for fit in fits)
            port_only = all(isinstance(fit, _PortTaken) for fit in fits)
            if port_only:
                raise PlacementError(Refusal.PRECONDITION, "PORT_IN_USE", reasons)
            raise PlacementError(
                Refusal.EXHAUSTED, "INSUFFICIENT_CAPACITY", f"no node can hold one replica: {reasons}"
            )
        chosen = next((fit for fit in possible if fit.replicas >= most), None)
        if chosen is None:
            chosen = max(possible, key=lambda fit: fit.replicas)  # the first of the largest
            need = max(low, 1)
            if chosen.replicas < need:
                raise PlacementError(
                    Refusal.EXHAUSTED,
                    "INSUFFICIENT_CAPACITY",
                    f"room for {chosen.replicas} replica(s) on {chosen.node.name}, "
                    f"at least {need} needed (free accelerators and host memory are short)",
                )
            granted_max = chosen.replicas
            change = f"max_replicas {most} -> {granted_max}"
            if start > granted_max:
                change += f", starting_replicas {start} -> {granted_max}"
                start = granted_max
            notes.append(
                Adjustment(
                    "REPLICAS_NARROWED",
                    f"capacity for {granted_max} of {most} replicas on {chosen.node.name}: {change}",
                )
            )
            most = granted_max
        return self._commit(deployment_id, ask, asked, chosen, engine, cpu, (low, start, most), notes)

    def _replicas(self, asked: Quantities, caps: Quantities, notes: list[Adjustment]) -> tuple[int, int, int]:
        low, start, most = asked.replicas_min, asked.replicas_start, asked.replicas_max
        filled: list[str] = []
        if low is None:
            low = _capped(min([1, *(v for v in (start, most) if v is not None)]), caps.replicas_min)
            filled.append(f"min_replicas {low}")
        if start is None:
            start = _capped(low, caps.replicas_start)
            filled.append(f"starting_replicas {start}")
        if most is None:
            most = _capped(max(start, low, 1), caps.replicas_max)
            filled.append(f"max_replicas {most}")
        if filled:
            notes.append(Adjustment("DEFAULTS_APPLIED", "replicas defaulted: " + ", ".join(filled)))
        if most < 1:
            raise PlacementError(Refusal.EXHAUSTED, "INSUFFICIENT_CAPACITY", "no replica was granted")
        clamped = [
            f"{name} {value} -> {most}"
            for name, value in (("min_replicas", low), ("starting_replicas", start))
            if value > most
        ]
        if clamped:
            notes.append(
                Adjustment("REPLICAS_NARROWED", "clamped to the granted max_replicas: " + ", ".join(clamped))
            )
        return min(low, most), min(start, most), most

    def _candidates(self, ask: Ask, asked: Quantities, cpu: bool) -> list[Node]:
        nodes = self.inventory.nodes
        where = "any region"
        if ask.region:
            nodes = tuple(node for node in nodes if node.region == ask.region)
            where = f"region {ask.region}"
            if not nodes:
                known = ", ".join(self.inventory.regions)
                raise PlacementError(
                    Refusal.PRECONDITION,
                    "REGION_UNAVAILABLE",
                    f"no node in region {ask.region} (regions: {known})",
                )
        if cpu:
            found = [node for node in nodes if node.cpu_only]
            if not found:
                raise PlacementError(Refusal.PRECONDITION, "VENDOR_MISMATCH", f"no CPU-only node in {where}")
            return found
        found = [node for node in nodes if not node.cpu_only]
        wanted = asked.accelerator_type.lower()
        if wanted:
            found = [node for node in found if node.accelerator_type.lower() == wanted]
        if not found:
            present = sorted({node.accelerator_type for node in nodes if not node.cpu_only})
            has = ", ".join(present) or "none"
            what = asked.accelerator_type or "accelerator"
            raise PlacementError(
                Refusal.PRECONDITION,
                "VENDOR_MISMATCH",
                f"no {what} nodes in {where} (accelerators there: {has})",
            )
        return found

    def _fit(
        self,
        node: Node,
        ask: Ask,
        asked: Quantities,
        caps: Quantities,
        engine: str,
        cpu: bool,
        most: int,
    ) -> _Fit | _Unfit:
        notes: list[Adjustment] = []
        memory_each = node.accelerator_memory_gib * GiB
        accelerator_memory = asked.accelerator_memory_bytes
        if cpu:
            count = 0
            if accelerator_memory is not None:
                accelerator_memory = 0
        elif asked.accelerator_count is not None:
            count = asked.accelerator_count
        elif accelerator_memory:
            count = _capped(max(1, math.ceil(accelerator_memory / memory_each)), caps.accelerator_count)
            notes.append(
                Adjustment(
                    "DEFAULTS_APPLIED",
                    f"{count} accelerator(s) per replica to hold {_gib(accelerator_memory)}",
                )
            )
        else:
            count = _capped(1, caps.accelerator_count)
            notes.append(Adjustment("DEFAULTS_APPLIED", f"{count} accelerator(s) per replica"))
        if not cpu and count > node.accelerator_count:
            return _Unfit(node, f"{count} accelerators per replica, it has {node.accelerator_count}")
        if not cpu and accelerator_memory is not None and accelerator_memory > count * memory_each:
            return _Unfit(
                node,
                f"{_gib(accelerator_memory)} of accelerator memory per replica, "
                f"{count} x {node.accelerator_type} hold {_gib(count * memory_each)}",
            )
        if not cpu and accelerator_memory is None:
            accelerator_memory = _capped(count * memory_each, caps.accelerator_memory_bytes)
            notes.append(
                Adjustment(
                    "MEMORY_COMPUTED",
                    f"accelerator memory {_gib(accelerator_memory)} per replica "
                    f"({count} x {node.accelerator_type} of {node.accelerator_memory_gib} GiB)",
                )
            )
        memory = asked.memory_bytes
        if memory is None:
            computed, how = host_memory_bytes(ask.model, engine)
            memory = _capped(computed, caps.memory_bytes)
            notes.append(Adjustment("MEMORY_COMPUTED", f"host memory {_gib(memory)} per replica ({how})"))
        if memory > node.host_memory_gib * GiB:
            return _Unfit(
                node, f"{_gib(memory)} of host memory per replica, it has {node.host_memory_gib} GiB"
            )
        ports = self._ports(node.name)
        if ask.port is not None and ask.port in ports:
            return _PortTaken(node, f"port {ask.port} is in use")
        port = (
            ask.port if ask.port is not None else next(p for p in range(FIRST_PORT, 65536) if p not in ports)
        )
        room = most
        if count:
            room = min(room, len(self.free_accelerators(node.name)) // count)
        if memory:
            room = min(room, self.free_memory_bytes(node.name) // memory)
        return _Fit(node, count, accelerator_memory, memory, port, room, tuple(notes))

    def _commit(
        self,
        deployment_id: str,
        ask: Ask,
        asked: Quantities,
        fit: _Fit,
        engine: str,
        cpu: bool,
        replicas: tuple[int, int, int],
        notes: list[Adjustment],
    ) -> Placement:
        low, start, most = replicas
        indexes = self.free_accelerators(fit.node.name)[: fit.accelerators * most]
        self._allocations[deployment_id] = _Allocation(
            fit.node.name, frozenset(indexes), fit.memory_bytes * most, fit.port
        )
        accelerator_type = asked.accelerator_type
        if cpu and (accelerator_type or asked.accelerator_memory_bytes):
            dropped = accelerator_type or "accelerator memory"
            notes.append(Adjustment("ACCELERATORS_DROPPED", f"no accelerators granted: {dropped} dropped"))
            accelerator_type = ""
        if not cpu and not accelerator_type:
            accelerator_type = fit.node.accelerator_type
            notes.append(
                Adjustment("DEFAULTS_APPLIED", f"accelerator type {accelerator_type} of {fit.node.name}")
            )
        granted = Quantities(
            accelerator_count=None if cpu and asked.accelerator_count is None else fit.accelerators,
            accelerator_type=accelerator_type,
            accelerator_memory_bytes=fit.accelerator_memory_bytes,
            memory_bytes=fit.memory_bytes,
            replicas_min=low,
            replicas_start=start,
            replicas_max=most,
            concurrency=asked.concurrency,
            duration_ms=asked.duration_ms,
        )
        return Placement(
            deployment_id=deployment_id,
            node=fit.node,
            accelerator_indexes=indexes,
            port=fit.port,
            engine=engine,
            granted=granted,
            adjustments=(*fit.notes, *notes),
        )


def summarize(adjustments: Sequence[Adjustment], extra: Iterable[Adjustment] = ()) -> tuple[str, str]:
    """One reason code and one reason text for several adjustments: the code
    of the only kind of adjustment, or PLACEMENT_ADJUSTED when there are
    several kinds; the text lists every one."""
    every = [*extra, *adjustments]
    codes = list(dict.fromkeys(a.reason_code for a in every))
    code = codes[0] if len(codes) == 1 else "PLACEMENT_ADJUSTED"
    return code, "; ".join(a.text for a in every)
