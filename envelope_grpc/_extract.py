"""Extractors: how a service's request maps into envelope fields.

One registry, keyed by full method name ("/package.Service/Method"). A method
is mapped either by a plain function (for protos one does not own) or
declaratively, by the ``envelope_grpc.v1`` options on the service's own
descriptors, found in the protobuf descriptor pool with no code per method.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import keyword
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from envelope_grpc._constants import DEFAULT_SKIPPED, MAX_MAP_ENTRIES
from envelope_grpc._envelope import QUANTITY_FIELDS
from envelope_grpc._values import (
    DIMENSION_ACCELERATOR_TYPE,
)
from envelope_grpc.v1 import options_pb2
from envelope_grpc.v1.envelope_pb2 import (
    DataClassification,
    ExecutionKind,
    Resources,
    Scope,
    Target,
)
from envelope_grpc.v1.options_pb2 import FieldRule, PrincipalField, ScopeField, TargetField


@dataclasses.dataclass(slots=True)
class Extraction:
    """What an extractor found in a request."""

    kind: ExecutionKind.ValueType = ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    target: Target = dataclasses.field(default_factory=Target)
    requested: Resources = dataclasses.field(default_factory=Resources)
    scope: Scope = dataclasses.field(default_factory=Scope)
    tenant: str = ""
    project: str = ""


#: A function that maps one request message into an Extraction.
Extractor = Callable[[Message], Extraction]


class Action(enum.Enum):
    """What to do with a call."""

    #: Build an envelope (with only transport facts when nothing maps it).
    RECORD = "record"
    #: Build no envelope; the call passes untouched.
    SKIP = "skip"
    #: Build an envelope and refuse the call (an unmapped method).
    DENY = "deny"


@dataclasses.dataclass(frozen=True, slots=True)
class MethodPlan:
    """How calls of one method are handled; computed once per method."""

    method: str
    action: Action
    extractor: Extractor | None = None
    kind: ExecutionKind.ValueType = ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    #: Writes into a given Extraction (declarative extractors): lets the core
    #: extract straight into the envelope's own messages.
    fill: Callable[[Message, Extraction], None] | None = None


class ExtractorRegistry:
    """Extractors by full method name, with a rule for unmapped methods.

    ``rules`` maps method names or fnmatch patterns ("/pkg.Svc/*") to an
    Action; gRPC health checking and reflection are skipped unless a rule
    says otherwise. ``unmapped`` applies to a method with neither an
    extractor nor annotations nor a matching rule.
    """

    def __init__(
        self,
        *,
        unmapped: Action = Action.RECORD,
        rules: Mapping[str, Action] | None = None,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self._unmapped = unmapped
        self._rules = {pattern: Action.SKIP for pattern in DEFAULT_SKIPPED} | dict(rules or {})
        self._pool = pool or descriptor_pool.Default()  # type: ignore[no-untyped-call]
        self._functions: dict[str, tuple[Extractor, ExecutionKind.ValueType]] = {}
        self._plans: dict[str, MethodPlan] = {}
        self._lock = threading.Lock()
        # Rules and functions are replaced, never changed in place, so that a
        # plan computed meanwhile reads a consistent set; the version tells it
        # whether it is still current when it is stored.
        self._version = 0

    def register(
        self,
        method: str,
        extractor: Extractor,
        *,
        kind: ExecutionKind.ValueType = ExecutionKind.EXECUTION_KIND_UNSPECIFIED,
    ) -> None:
        """Map ``method`` with a function; ``kind`` is used when it returns none."""
        if not method.startswith("/") or method.count("/") != 2:
            raise ValueError(f"not a full method name: {method!r} (expected '/package.Service/Method')")
        with self._lock:
            self._functions = {**self._functions, method: (extractor, kind)}
            self._changed()

    def set_rule(self, pattern: str, action: Action) -> None:
        """What to do with calls of methods matching ``pattern`` (a full method
        name or an fnmatch pattern); replaces an earlier rule for it."""
        with self._lock:
            self._rules = {**self._rules, pattern: action}
            self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._plans = {}

    def plan(self, method: str) -> MethodPlan:
        """The plan for ``method``, computed on first sight and cached."""
        found = self._plans.get(method)
        if found is None:
            version = self._version
            found = self._compute(method)
            with self._lock:
                if self._version == version:  # else a rule changed meanwhile: compute again next time
                    self._plans[method] = found
        return found

    def _rule(self, method: str) -> Action | None:
        if method in self._rules:
            return self._rules[method]
        for pattern, action in self._rules.items():
            if fnmatch.fnmatchcase(method, pattern):
                return action
        return None

    def _compute(self, method: str) -> MethodPlan:
        rule = self._rule(method)
        if rule is Action.SKIP or rule is Action.DENY:
            return MethodPlan(method, rule)
        if method in self._functions:
            extractor, kind = self._functions[method]
            return MethodPlan(method, Action.RECORD, extractor, kind)
        descriptor = _find_method(self._pool, method)
        if descriptor is not None:
            declared = declarative_plan(method, descriptor)
            if declared is not None:
                return declared
        return MethodPlan(method, rule or self._unmapped)


def _find_method(pool: descriptor_pool.DescriptorPool, method: str) -> MethodDescriptor | None:
    service, _, name = method[1:].partition("/")
    try:
        found: MethodDescriptor | None = pool.FindServiceByName(service).methods_by_name.get(name)  # type: ignore[no-untyped-call]
    except KeyError:
        return None
    return found


# -- declarative extraction -------------------------------------------------------

_MAX_DEPTH: Final = 8
_INT64: Final = 2**63
_Apply = Callable[[Extraction, Any], None]
_Fill = Callable[[Message, Extraction], None]


def declarative_plan(method: str, descriptor: MethodDescriptor) -> MethodPlan | None:
    """The plan declared by ``envelope_grpc.v1`` options on a method and its
    request type, or None when neither is annotated."""
    options = descriptor.GetOptions()
    rule = options.Extensions[options_pb2.method] if options.HasExtension(options_pb2.method) else None
    source = _Source()
    body = source.message(descriptor.input_type, "request", frozenset(), 0, 1)
    if rule is None and not body:
        return None
    if rule is not None and rule.skip:
        return MethodPlan(method, Action.SKIP)
    kind = rule.kind if rule is not None else ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    target_type = rule.target_type if rule is not None else ""
    if target_type:
        body.insert(0, f"    found.target.type = {source.constant(target_type)}")
    extractor = _DeclaredExtractor(kind, source.function(descriptor.input_type.full_name, body))
    return MethodPlan(method, Action.RECORD, extractor, kind, extractor.fill)


class _Source:
    """Compiles the field rules of a request type into the source of one
    function, ``fill(request, found)``: straight-line code specialized for
    each annotated field's shape (repeated, with presence or not, enum,
    nested), so the per-call walk makes no decision of its own and calls
    nothing for the common destinations. The source holds only field names
    from descriptors and generated names; every value is a constant bound
    by name."""

    def __init__(self) -> None:
        self.constants: dict[str, Any] = {"_text": _text, "_INT64": _INT64}
        self._names = 0

    def name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def constant(self, value: Any) -> str:
        name = self.name("c")
        self.constants[name] = value
        return name

    def function(self, type_name: str, body: list[str]) -> _Fill:
        source = "def fill(request, found):\n" + "\n".join(body or ["    pass"]) + "\n"
        namespace = dict(self.constants)
        exec(compile(source, f"<envelope_grpc extraction of {type_name}>", "exec"), namespace)
        fill: _Fill = namespace["fill"]
        return fill

    def message(
        self, message: Descriptor, var: str, seen: frozenset[str], depth: int, indent: int
    ) -> list[str]:
        """Lines that visit every annotated field of ``message`` (in ``var``),
        or of its nested messages."""
        lines: list[str] = []
        pad = "    " * indent
        for field in message.fields:
            options = field.GetOptions()
            read = _read(var, field.name)
            if options.HasExtension(options_pb2.field):
                value = self.name("v")
                apply = self.apply(options.Extensions[options_pb2.field], field, value, indent + 1)
                if field.label == FieldDescriptor.LABEL_REPEATED:
                    lines.append(f"{pad}for {value} in {read}:")
                elif field.has_presence:
                    lines += [f"{pad}if {var}.HasField({field.name!r}):", f"{pad}    {value} = {read}"]
                else:
                    default = field.default_value
                    test = value if not default else f"{value} != {self.constant(default)}"
                    lines += [f"{pad}{value} = {read}", f"{pad}if {test}:"]
                if field.enum_type is not None:
                    names = {v.number: v.name for v in field.enum_type.values}
                    lines.append(f"{pad}    {value} = {self.constant(names)}.get({value}, {value})")
                lines += apply
                continue
            nested = field.message_type
            if (
                nested is None
                or nested.GetOptions().map_entry
                or nested.full_name in seen
                or nested.full_name.startswith("google.protobuf.")
                or depth + 1 >= _MAX_DEPTH
            ):
                continue
            inner = self.name("m")
            children = self.message(nested, inner, seen | {message.full_name}, depth + 1, indent + 1)
            if not children:
                continue
            if field.label == FieldDescriptor.LABEL_REPEATED:
                lines.append(f"{pad}for {inner} in {read}:")
            else:
                lines += [f"{pad}if {var}.HasField({field.name!r}):", f"{pad}    {inner} = {read}"]
            lines += children
        return lines

    def apply(self, rule: FieldRule, field: FieldDescriptor, value: str, indent: int) -> list[str]:
        """Lines that write ``value`` (a value of ``field``) where ``rule`` says."""
        pad = "    " * indent
        text = field.type == FieldDescriptor.TYPE_STRING
        integer = field.cpp_type in _INTEGERS and field.enum_type is None
        once = _once(rule)
        if once is not None:  # a single-valued text destination: the first value wins
            holder, part = once
            limit = _LIMITS.get(part, _MAX_VALUE)
            converted = value if text else f"_text({value})"
            return [
                f"{pad}if not found{holder}.{part}:",
                f"{pad}    found{holder}.{part} = {converted}[:{limit}]",
            ]
        if rule.WhichOneof("destination") == "resource" and integer:
            name = QUANTITY_FIELDS.get(rule.resource)
            if name is not None:
                amount, total = self.name("a"), self.name("t")
                return [
                    f"{pad}{amount} = {value} * {rule.scale or 1}",
                    f"{pad}{total} = found.requested.{name} + {amount} "
                    f"if found.requested.HasField({name!r}) else {amount}",
                    f"{pad}if abs({total}) >= _INT64 or abs({amount}) >= _INT64:",
                    f"{pad}    raise ValueError({f'{name} is out of range'!r})",
                    f"{pad}found.requested.{name} = {total}",
                ]
        return [f"{pad}{self.constant(_applier(rule))}(found, {value})"]


def _read(var: str, name: str) -> str:
    """Source that reads field ``name`` of ``var``: an attribute, or getattr
    for a field named like a Python keyword ("from", "class", ...)."""
    return f"getattr({var}, {name!r})" if keyword.iskeyword(name) else f"{var}.{name}"


_INTEGERS: Final = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)


def _once(rule: FieldRule) -> tuple[str, str] | None:
    """Where a single-valued text rule writes: (holder, field), the holder
    as an attribute path from the Extraction ("" for itself)."""
    destination = rule.WhichOneof("destination")
    if destination == "target":
        return ".target", "name" if rule.target == TargetField.TARGET_FIELD_NAME else "version"
    if destination == "principal":
        return "", "tenant" if rule.principal == PrincipalField.PRINCIPAL_FIELD_TENANT else "project"
    if destination == "resource" and rule.resource == DIMENSION_ACCELERATOR_TYPE:
        return ".requested", "accelerator_type"
    if destination == "scope" and rule.scope in (
        ScopeField.SCOPE_FIELD_REGION,
        ScopeField.SCOPE_FIELD_PURPOSE,
    ):
        return ".scope", "region" if rule.scope == ScopeField.SCOPE_FIELD_REGION else "purpose"
    return None


class _DeclaredExtractor:
    """Applies the field rules found on a request type."""

    __slots__ = ("fill", "kind")

    def __init__(self, kind: ExecutionKind.ValueType, fill: _Fill) -> None:
        self.kind = kind
        #: Writes what a request declares into a given Extraction.
        self.fill = fill

    def __call__(self, request: Message) -> Extraction:
        found = Extraction(kind=self.kind)
        self.fill(request, found)
        return found


def _text(value: Any) -> str:
    if value.__class__ is str:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_CLASSIFICATIONS: Final[Mapping[str, DataClassification.ValueType]] = {
    **{name: number for name, number in DataClassification.items()},
    **{name.removeprefix("DATA_CLASSIFICATION_"): number for name, number in DataClassification.items()},
}


_UNCLASSIFIED: Final = DataClassification.DATA_CLASSIFICATION_UNSPECIFIED


def _classification(value: Any) -> DataClassification.ValueType:
    return _CLASSIFICATIONS.get(_text(value).upper(), _UNCLASSIFIED)


# The contract's length limits (envelope.proto): request values are untrusted
# and are cut to fit, so an envelope stays valid whatever a caller sends.
_LIMITS: Final = {
    "name": 256,
    "version": 128,
    "tenant": 128,
    "project": 128,
    "accelerator_type": 128,
    "region": 64,
    "purpose": 256,
}
_MAX_VALUE: Final = 512
_MAX_KEY: Final = 64
_MAX_ITEMS: Final = {"datasets": 64, "policy_refs": 32}


def _applier(rule: FieldRule) -> _Apply:
    """A function that writes one value where ``rule`` says it goes, for the
    destinations that compiled code does not write itself."""
    destination = rule.WhichOneof("destination")
    if destination == "resource":
        return _resource_applier(rule)
    if destination == "scope":
        return _scope_applier(rule.scope)
    if destination == "target_attribute":
        attribute = rule.target_attribute[:_MAX_KEY]

        def put_attribute(found: Extraction, value: Any) -> None:  # the first value wins
            entries = found.target.attributes
            if attribute not in entries and len(entries) < MAX_MAP_ENTRIES:
                entries[attribute] = _text(value)[:_MAX_VALUE]

        return put_attribute
    if destination == "hint":
        hint = rule.hint[:_MAX_KEY]

        def put_hint(found: Extraction, value: Any) -> None:  # the last value wins
            entries = found.scope.hints
            if hint in entries or len(entries) < MAX_MAP_ENTRIES:
                entries[hint] = _text(value)[:_MAX_VALUE]

        return put_hint
    raise ValueError(f"a field rule without a destination: {rule}")


def _resource_applier(rule: FieldRule) -> _Apply:
    name = QUANTITY_FIELDS.get(rule.resource)
    if name is None:
        raise ValueError(f"not a quantity dimension: {rule.resource}")
    scale = rule.scale or 1

    def add(found: Extraction, value: Any) -> None:  # integers are added by compiled code, exactly
        number = float(value) * scale
        if not math.isfinite(number) or abs(number) >= _INT64:
            raise ValueError(f"{name} is out of range")
        amount = round(number)
        requested = found.requested
        total = getattr(requested, name) + amount if requested.HasField(name) else amount
        if abs(total) >= _INT64 or abs(amount) >= _INT64:
            raise ValueError(f"{name} is out of range")
        setattr(requested, name, total)

    return add


def _scope_applier(field: ScopeField.ValueType) -> _Apply:
    if field == ScopeField.SCOPE_FIELD_DATA_CLASSIFICATION:

        def classify(found: Extraction, value: Any) -> None:  # the first value wins
            scope = found.scope
            if not scope.data_classification:
                scope.data_classification = _classification(value)

        return classify
    if field in (ScopeField.SCOPE_FIELD_DATASET, ScopeField.SCOPE_FIELD_POLICY_REF):
        part = "datasets" if field == ScopeField.SCOPE_FIELD_DATASET else "policy_refs"
        most = _MAX_ITEMS[part]

        def append(found: Extraction, value: Any) -> None:
            items = getattr(found.scope, part)
            if len(items) < most:
                items.append(_text(value)[:_MAX_VALUE])

        return append
    raise ValueError(f"not a scope field: {field}")
