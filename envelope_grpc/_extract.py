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
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from envelope_grpc._constants import DEFAULT_SKIPPED
from envelope_grpc._envelope import DIMENSION_FIELDS
from envelope_grpc.v1 import options_pb2
from envelope_grpc.v1.envelope_pb2 import (
    DataClassification,
    ExecutionKind,
    ResourceDimension,
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
            self._functions[method] = (extractor, kind)
            self._plans.pop(method, None)

    def plan(self, method: str) -> MethodPlan:
        """The plan for ``method``, computed on first sight and cached."""
        found = self._plans.get(method)
        if found is None:
            found = self._compute(method)
            with self._lock:
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
_Path = tuple[FieldDescriptor, ...]


def declarative_plan(method: str, descriptor: MethodDescriptor) -> MethodPlan | None:
    """The plan declared by ``envelope_grpc.v1`` options on a method and its
    request type, or None when neither is annotated."""
    options = descriptor.GetOptions()
    rule = options.Extensions[options_pb2.method] if options.HasExtension(options_pb2.method) else None
    leaves = _leaves(descriptor.input_type, (), frozenset())
    if rule is None and not leaves:
        return None
    if rule is not None and rule.skip:
        return MethodPlan(method, Action.SKIP)
    kind = rule.kind if rule is not None else ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    target_type = rule.target_type if rule is not None else ""
    return MethodPlan(method, Action.RECORD, _DeclaredExtractor(kind, target_type, leaves), kind)


def _leaves(message: Descriptor, path: _Path, seen: frozenset[str]) -> list[tuple[_Path, FieldRule]]:
    found: list[tuple[_Path, FieldRule]] = []
    for field in message.fields:
        options = field.GetOptions()
        here = (*path, field)
        if options.HasExtension(options_pb2.field):
            found.append((here, options.Extensions[options_pb2.field]))
        elif (
            field.message_type is not None
            and not field.message_type.GetOptions().map_entry
            and field.message_type.full_name not in seen
            and not field.message_type.full_name.startswith("google.protobuf.")
            and len(here) < _MAX_DEPTH
        ):
            found += _leaves(field.message_type, here, seen | {message.full_name})
    return found


def _values(message: Message, path: _Path) -> Iterator[Any]:
    """Every set value at ``path``, descending through repeated fields."""
    field, rest = path[0], path[1:]
    if field.label == FieldDescriptor.LABEL_REPEATED:
        items: Sequence[Any] = getattr(message, field.name)
    elif field.has_presence:
        if not message.HasField(field.name):
            return
        items = (getattr(message, field.name),)
    else:
        value = getattr(message, field.name)
        if value == field.default_value:
            return
        items = (value,)
    for item in items:
        if rest:
            yield from _values(item, rest)
        elif field.enum_type is not None:
            entry = field.enum_type.values_by_number.get(item)
            yield item if entry is None else entry.name
        else:
            yield item


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _classification(value: Any) -> DataClassification.ValueType:
    name = _text(value).upper()
    for candidate in (name, f"DATA_CLASSIFICATION_{name}"):
        if candidate in DataClassification.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
            return DataClassification.Value(candidate)
    return DataClassification.DATA_CLASSIFICATION_UNSPECIFIED


class _DeclaredExtractor:
    """Applies the field rules found on a request type."""

    __slots__ = ("kind", "leaves", "target_type")

    def __init__(
        self, kind: ExecutionKind.ValueType, target_type: str, leaves: list[tuple[_Path, FieldRule]]
    ) -> None:
        self.kind = kind
        self.target_type = target_type
        self.leaves = leaves

    def __call__(self, request: Message) -> Extraction:
        found = Extraction(kind=self.kind)
        if self.target_type:
            found.target.type = self.target_type
        for path, rule in self.leaves:
            for value in _values(request, path):
                _apply(found, rule, value)
        return found


def _apply(found: Extraction, rule: FieldRule, value: Any) -> None:
    destination = rule.WhichOneof("destination")
    if destination == "target":
        name = "name" if rule.target == TargetField.TARGET_FIELD_NAME else "version"
        if not getattr(found.target, name):
            setattr(found.target, name, _text(value))
    elif destination == "target_attribute":
        found.target.attributes.setdefault(rule.target_attribute, _text(value))
    elif destination == "principal":
        if rule.principal == PrincipalField.PRINCIPAL_FIELD_TENANT:
            found.tenant = found.tenant or _text(value)
        elif rule.principal == PrincipalField.PRINCIPAL_FIELD_PROJECT:
            found.project = found.project or _text(value)
    elif destination == "resource":
        _add_resource(found.requested, rule, value)
    elif destination == "scope":
        _add_scope(found.scope, rule.scope, value)
    elif destination == "hint":
        found.scope.hints[rule.hint] = _text(value)


def _add_resource(requested: Resources, rule: FieldRule, value: Any) -> None:
    name = DIMENSION_FIELDS.get(rule.resource)
    if name is None:
        return
    if rule.resource == ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_TYPE:
        requested.accelerator_type = requested.accelerator_type or _text(value)
        return
    amount = round(float(value) * (rule.scale or 1))
    setattr(requested, name, getattr(requested, name) + amount if requested.HasField(name) else amount)


def _add_scope(scope: Scope, field: ScopeField.ValueType, value: Any) -> None:
    if field == ScopeField.SCOPE_FIELD_DATA_CLASSIFICATION:
        scope.data_classification = scope.data_classification or _classification(value)
    elif field == ScopeField.SCOPE_FIELD_REGION:
        scope.region = scope.region or _text(value)
    elif field == ScopeField.SCOPE_FIELD_PURPOSE:
        scope.purpose = scope.purpose or _text(value)
    elif field == ScopeField.SCOPE_FIELD_DATASET:
        scope.datasets.append(_text(value))
    elif field == ScopeField.SCOPE_FIELD_POLICY_REF:
        scope.policy_refs.append(_text(value))
