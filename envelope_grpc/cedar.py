"""Cedar admission policies over execution envelopes.

The Cedar schema is generated from the envelope contract: the protobuf
descriptors of ``Principal``, ``Target`` and the envelope's context parts are
walked, so a field added to the contract appears in the schema without a
hand-written list. In that schema (namespace ``EnvelopeGrpc``):

- ``EnvelopeGrpc::Principal`` has every ``Principal`` field as an attribute;
  its id is the subject, or ``"anonymous"`` when there is none;
- ``EnvelopeGrpc::Target`` has every ``Target`` field as an attribute, its
  ``attributes`` map as entity tags (``resource.hasTag("engine")``,
  ``resource.getTag("engine")``); its id is ``"<type>/<name>"``;
- one action per execution kind, ``EnvelopeGrpc::Action::"inference"``,
  ``"deployment"``, ... (never ``unspecified``), from Principal to Target;
- the context holds ``method``, ``requested`` (every quantity an optional
  Long, so test it with ``has`` first), ``scope``, ``lineage`` and ``flags``.

Field types map as: strings to String, integers to Long, bools to Bool, enums
to String (the value's lowercase name without the enum prefix, e.g.
``"restricted"``, as in the span attributes), repeated fields to Set, messages
to records; a proto3 ``optional`` field is an optional attribute, absent when
unset; a ``map<string, V>`` is the entity's tags on an entity, and a
``Set<{key, value}>`` in the context (``context.scope.hints.contains({key:
"purpose", value: "support-bot"})``).

``CedarPolicy`` parses and validates a policy set once, at start-up, and
evaluates each envelope with pre-parsed handles.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import cedarpy
import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from envelope_grpc._policy import Allow, Deny, Verdict
from envelope_grpc._values import BASIS_FORBIDDEN, BASIS_NOT_PERMITTED, enum_names
from envelope_grpc.v1.envelope_pb2 import ExecutionEnvelope, ExecutionKind, Principal, Target

__all__ = [
    "ANONYMOUS",
    "FORBIDDEN",
    "NAMESPACE",
    "NOT_PERMITTED",
    "CedarEvaluationError",
    "CedarPolicy",
    "CedarPolicyError",
    "cedar_request",
    "cedar_schema",
    "cedar_schema_json",
]

#: The Cedar namespace of the generated schema.
NAMESPACE: Final = "EnvelopeGrpc"
#: The principal entity id of a caller without a subject.
ANONYMOUS: Final = "anonymous"
#: Reason codes of the denials a CedarPolicy makes.
FORBIDDEN: Final = "CEDAR_FORBIDDEN"
NOT_PERMITTED: Final = "CEDAR_NOT_PERMITTED"
#: Policy annotations whose text becomes the verdict's message, first found wins.
REASON_ANNOTATIONS: Final = ("reason", "message")

_ACTION_TYPE: Final = f"{NAMESPACE}::Action"

# Which envelope fields feed the request: the entity types and the context
# attributes name a path into ExecutionEnvelope; their types come from it.
_PRINCIPAL_PATH: Final = ("principal",)
_TARGET_PATH: Final = ("execution", "target")
_CONTEXT_PATHS: Final = (
    ("execution", "method"),
    ("requested",),
    ("scope",),
    ("lineage",),
    ("flags",),
)


class CedarPolicyError(ValueError):
    """A Cedar policy set or schema that cannot be used: it does not parse,
    or it does not validate against the schema. ``errors`` lists each
    problem, prefixed with the policy's ``@id`` (or Cedar's policy id)."""

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        self.errors = tuple(errors)
        super().__init__("\n  ".join((message, *self.errors)))


class CedarEvaluationError(RuntimeError):
    """Cedar could not evaluate a request: a policy raised an error (an
    overflow, a missing entity, ...) or the request does not fit the schema.
    Raised, never turned into a denial, so the admission seam records a
    policy error and fails closed (or open, as configured)."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(self.errors) or "Cedar reached no decision")


# -- the contract as Cedar types -------------------------------------------------------

_T = FieldDescriptor
_LONG_TYPES: Final = frozenset(
    {
        _T.TYPE_INT32,
        _T.TYPE_INT64,
        _T.TYPE_SINT32,
        _T.TYPE_SINT64,
        _T.TYPE_SFIXED32,
        _T.TYPE_SFIXED64,
        _T.TYPE_UINT32,
        _T.TYPE_FIXED32,
    }
)
# Types with no faithful Cedar form (uint64 exceeds Long; no floats or bytes;
# timestamps are not policy inputs here) are left out of schema and request.
_SKIPPED_MESSAGES: Final = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})

_Convert = Callable[[Any], Any]


@dataclasses.dataclass(slots=True)
class _Types:
    """The common types declared while walking the contract."""

    common: dict[str, Any] = dataclasses.field(default_factory=dict)
    origin: dict[str, str] = dataclasses.field(default_factory=dict)
    walking: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    """One contract field: its Cedar type and how to read it from a message."""

    name: str
    cedar: dict[str, Any]
    optional: bool
    read: Callable[[Message], Any]
    #: The field's value is its Cedar value (a scalar needing no conversion).
    direct: bool = False


def _element(field: FieldDescriptor, types: _Types) -> tuple[dict[str, Any], _Convert] | None:
    """The Cedar type of one value of ``field`` and its converter."""
    if field.type == _T.TYPE_STRING:
        return {"type": "String"}, _same
    if field.type == _T.TYPE_BOOL:
        return {"type": "Bool"}, _same
    if field.type in _LONG_TYPES:
        return {"type": "Long"}, _same
    if field.type == _T.TYPE_ENUM:
        names = enum_names(field.enum_type)
        return {"type": "String"}, lambda value: names.get(value, str(value))
    if field.type == _T.TYPE_MESSAGE and field.message_type.full_name not in _SKIPPED_MESSAGES:
        record = _record(field.message_type, types)
        return {"type": field.message_type.name}, record
    return None


def _same(value: Any) -> Any:
    return value


def _attribute(field: FieldDescriptor, types: _Types, *, always: bool = False) -> _Field | None:
    """``field`` as a Cedar attribute, or None when it has no Cedar form.
    With ``always``, a singular field is required even if it has presence
    (read as its default when unset)."""
    name = field.name
    if _is_map(field):
        value = _map_value(field, types)
        if value is None:
            return None
        pair = {"type": "Record", "attributes": {"key": {"type": "String"}, "value": value[0]}}
        read = functools.partial(_read_pairs, name, value[1])
        return _Field(name, {"type": "Set", "element": pair}, False, read)
    element = _element(field, types)
    if element is None:
        return None
    cedar, convert = element
    if field.is_repeated:
        return _Field(
            name, {"type": "Set", "element": cedar}, False, functools.partial(_read_set, name, convert)
        )
    direct = convert is _same
    if field.has_presence and not always:
        return _Field(name, cedar, True, functools.partial(_read_optional, name, convert), direct)
    return _Field(name, cedar, False, functools.partial(_read_value, name, convert), direct)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _map_value(field: FieldDescriptor, types: _Types) -> tuple[Any, _Convert] | None:
    """The Cedar type and conversion of a string-keyed map's values, or None."""
    entry = field.message_type.fields_by_name
    if entry["key"].type != _T.TYPE_STRING:
        return None
    return _element(entry["value"], types)


_Tags = tuple[dict[str, Any], Callable[[Message], dict[str, Any]]]


def _fields(message: Descriptor, types: _Types, *, tags: bool = False) -> tuple[list[_Field], _Tags | None]:
    """The Cedar attributes of ``message``; with ``tags``, its string-keyed
    map becomes the entity's tags (returned second) instead of an attribute."""
    found: list[_Field] = []
    tag: _Tags | None = None
    for field in message.fields:
        if tags and _is_map(field):
            if tag is not None:
                raise TypeError(f"{message.full_name} has more than one map to become entity tags")
            value = _map_value(field, types)
            if value is not None:
                tag = value[0], functools.partial(_read_tags, field.name, value[1])
            continue
        attribute = _attribute(field, types)
        if attribute is not None:
            found.append(attribute)
    return found, tag


def _read_value(name: str, convert: _Convert, message: Message) -> Any:
    return convert(getattr(message, name))


def _read_optional(name: str, convert: _Convert, message: Message) -> Any:
    return convert(getattr(message, name)) if message.HasField(name) else _ABSENT


def _read_set(name: str, convert: _Convert, message: Message) -> list[Any]:
    return [convert(value) for value in getattr(message, name)]


def _read_pairs(name: str, convert: _Convert, message: Message) -> list[dict[str, Any]]:
    items = getattr(message, name).items()
    return [{"key": key, "value": convert(value)} for key, value in sorted(items)]


def _read_tags(name: str, convert: _Convert, message: Message) -> dict[str, Any]:
    return {key: convert(value) for key, value in getattr(message, name).items()}


_ABSENT: Final = object()


def _shape(fields: Sequence[_Field]) -> dict[str, Any]:
    attributes = {
        field.name: {**field.cedar, "required": False} if field.optional else dict(field.cedar)
        for field in fields
    }
    return {"type": "Record", "attributes": attributes}


def _converter(fields: Sequence[_Field]) -> Callable[[Message], dict[str, Any]]:
    # Scalars read directly (the hot path: most fields), the rest converted.
    plain = tuple(field.name for field in fields if field.direct and not field.optional)
    optional = tuple(field.name for field in fields if field.direct and field.optional)
    readers = tuple((field.name, field.read) for field in fields if not field.direct)

    def convert(message: Message) -> dict[str, Any]:
        out = {name: getattr(message, name) for name in plain}
        for name in optional:
            if message.HasField(name):
                out[name] = getattr(message, name)
        for name, read in readers:
            value = read(message)
            if value is not _ABSENT:
                out[name] = value
        return out

    return convert


def _record(message: Descriptor, types: _Types) -> Callable[[Message], dict[str, Any]]:
    """Declare ``message`` as a common type named after it and return its
    converter."""
    name = message.name
    if types.origin.setdefault(name, message.full_name) != message.full_name:
        raise TypeError(f"two contract messages are named {name}: {types.origin[name]}, {message.full_name}")
    if name in types.walking:
        raise TypeError(f"{message.full_name} is recursive, which a Cedar type cannot be")
    types.walking.add(name)
    fields, _ = _fields(message, types)
    types.walking.discard(name)
    types.common[name] = _shape(fields)
    return _converter(fields)


def _descend(message: Descriptor, path: Sequence[str]) -> FieldDescriptor:
    field: FieldDescriptor = message.fields_by_name[path[0]]
    for name in path[1:]:
        field = field.message_type.fields_by_name[name]
    return field


def _getter(path: Sequence[str]) -> Callable[[Message], Any]:
    def get(message: Message) -> Any:
        for name in path:
            message = getattr(message, name)
        return message

    return get


@dataclasses.dataclass(frozen=True, slots=True)
class _Entity:
    type: str
    shape: dict[str, Any]
    tags: dict[str, Any] | None
    attrs: Callable[[Message], dict[str, Any]]
    read_tags: Callable[[Message], dict[str, Any]] | None


def _entity(type_name: str, path: Sequence[str], types: _Types) -> _Entity:
    message = _descend(ExecutionEnvelope.DESCRIPTOR, path).message_type
    fields, tag = _fields(message, types, tags=True)
    return _Entity(
        f"{NAMESPACE}::{type_name}",
        _shape(fields),
        tag[0] if tag else None,
        _converter(fields),
        tag[1] if tag else None,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Contract:
    """The generated schema and the converters that fill requests for it."""

    schema: dict[str, Any]
    principal: _Entity
    target: _Entity
    context: Sequence[tuple[str, Callable[[Message], Any], Callable[[Message], Any]]]
    actions: Mapping[int, str]


@functools.cache
def _contract() -> _Contract:
    types = _Types(origin={"Context": "the request context"})
    principal = _entity("Principal", _PRINCIPAL_PATH, types)
    target = _entity("Target", _TARGET_PATH, types)
    context_fields: list[_Field] = []
    context: list[tuple[str, Callable[[Message], Any], Callable[[Message], Any]]] = []
    for path in _CONTEXT_PATHS:
        # The context's parts are always present (an empty record when unset).
        part = _attribute(_descend(ExecutionEnvelope.DESCRIPTOR, path), types, always=True)
        if part is None:
            raise TypeError(f"context part {'.'.join(path)} has no Cedar form")
        context_fields.append(part)
        context.append((part.name, _getter(path[:-1]), part.read))
    types.common["Context"] = _shape(context_fields)
    actions = {
        number: name
        for number, name in enum_names(ExecutionKind.DESCRIPTOR).items()
        if number != ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    }
    applies = {"principalTypes": ["Principal"], "resourceTypes": ["Target"], "context": {"type": "Context"}}
    entity_types: dict[str, Any] = {}
    for name, entity in (("Principal", principal), ("Target", target)):
        entity_types[name] = {"shape": entity.shape}
        if entity.tags is not None:
            entity_types[name]["tags"] = entity.tags
    schema = {
        NAMESPACE: {
            "commonTypes": dict(sorted(types.common.items())),
            "entityTypes": entity_types,
            "actions": {name: {"appliesTo": copy.deepcopy(applies)} for name in actions.values()},
        }
    }
    return _Contract(schema, principal, target, tuple(context), actions)


def cedar_schema_json() -> dict[str, Any]:
    """The Cedar schema of envelope requests, in Cedar's JSON schema format
    (a fresh copy), generated from the envelope contract's descriptors."""
    return copy.deepcopy(_contract().schema)


@functools.cache
def cedar_schema() -> str:
    """The Cedar schema of envelope requests, in Cedar's schema syntax,
    generated from the envelope contract's descriptors."""
    return str(_schema_handle())


@functools.cache
def _schema_handle() -> cedarpy.Schema:
    return cedarpy.Schema.from_json_str(json.dumps(_contract().schema))


# -- requests ----------------------------------------------------------------------------


def _uid(type_name: str, entity_id: str) -> dict[str, str]:
    return {"type": type_name, "id": entity_id}


def _principal_uid(principal: Principal) -> dict[str, str]:
    return _uid(_contract().principal.type, principal.subject or ANONYMOUS)


def _target_uid(target: Target) -> dict[str, str]:
    return _uid(_contract().target.type, f"{target.type}/{target.name}")


def _entities(principal: Principal, target: Target) -> list[dict[str, Any]]:
    """The request's Principal and Target entities, in Cedar's JSON form."""
    contract = _contract()
    target_entity: dict[str, Any] = {
        "uid": _target_uid(target),
        "attrs": contract.target.attrs(target),
        "parents": [],
    }
    if contract.target.read_tags is not None:
        target_entity["tags"] = contract.target.read_tags(target)
    principal_entity = {
        "uid": _principal_uid(principal),
        "attrs": contract.principal.attrs(principal),
        "parents": [],
    }
    return [principal_entity, target_entity]


def _request(env: ExecutionEnvelope, action: str) -> dict[str, Any]:
    """The Cedar request of ``env``: principal, action, resource, context."""
    return {
        "principal": _principal_uid(env.principal),
        "action": _uid(_ACTION_TYPE, action),
        "resource": _target_uid(env.execution.target),
        "context": {name: read(parent(env)) for name, parent, read in _contract().context},
    }


def cedar_request(envelope: ExecutionEnvelope) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Cedar request (principal, action, resource, context) and the
    request's entities (its Principal and Target) that ``CedarPolicy``
    evaluates for ``envelope``: for replaying recorded envelopes with cedarpy
    or the Cedar CLI. Raises ValueError for an execution kind without an
    action (unspecified)."""
    action = _contract().actions.get(envelope.execution.kind)
    if action is None:
        raise ValueError(f"execution kind {envelope.execution.kind} has no Cedar action")
    return _request(envelope, action), _entities(envelope.principal, envelope.execution.target)


# -- the policy ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    id: str
    reason: str


def _load_schema(schema: str | Mapping[str, Any] | cedarpy.Schema | None) -> cedarpy.Schema:
    if schema is None:
        return _schema_handle()
    if isinstance(schema, cedarpy.Schema):
        return schema
    try:
        if isinstance(schema, str):
            if schema.lstrip().startswith("{"):
                return cedarpy.Schema.from_json_str(schema)
            return cedarpy.Schema.from_str(schema)
        return cedarpy.Schema.from_json_str(json.dumps(schema))
    except ValueError as error:
        raise CedarPolicyError(f"the Cedar schema does not parse: {error}") from None


def _rules(policy_set: cedarpy.PolicySet) -> dict[str, _Rule]:
    """Cedar policy id -> the rule id (``@id`` or the policy id) and reason text."""
    try:
        tree = policy_set.to_pst()
    except ValueError:  # syntax newer than cedarpy's node types: ids only
        return {}
    rules: dict[str, _Rule] = {}

    def add(policy_id: str, annotations: Mapping[str, str]) -> None:
        reason = next((annotations[key] for key in REASON_ANNOTATIONS if annotations.get(key)), "")
        rules[policy_id] = _Rule(annotations.get("id") or policy_id, reason)

    for policy_id, policy in tree.static_policies.items():
        add(policy_id, policy.annotations)
    for link in tree.template_links:
        template = tree.templates.get(link.template_id)
        add(link.new_id, template.annotations if template is not None else {})
    return rules


def _parse_entities(base: cedarpy.Entities, principal: bytes, target: bytes) -> cedarpy.Entities:
    """``base`` plus the request entities of a serialized Principal and Target."""
    entities = _entities(Principal.FromString(principal), Target.FromString(target))
    return base.with_added_json_str(json.dumps(entities, separators=_COMPACT))


class CedarPolicy:
    """An admission policy written in Cedar.

    ``policies`` (Cedar policy text) is parsed once and validated against
    ``schema`` (default: the schema generated from the envelope contract,
    see ``cedar_schema``); a policy that does not parse or names an unknown
    attribute, action or entity type raises ``CedarPolicyError`` here, at
    start-up, listing every problem. ``entities`` are extra static entities
    (Cedar JSON: a string, a list of entity dicts, or a ``cedarpy.Entities``
    handle) parsed once; they must not reuse the uid of a request's
    Principal or Target.

    Each call evaluates the envelope's request (see ``cedar_request``) with
    the pre-parsed policy set and entities; a request's Principal and Target
    entities are parsed once per distinct content (an LRU of
    ``entity_cache`` handles). Requests are built from the same descriptors
    as the schema, so they are not checked against it again unless
    ``strict`` asks for it (roughly 50 µs more a call). Permitted: ``Allow`` with
    the determining policies as rule ids. Refused: ``Deny`` with
    PERMISSION_DENIED and ``CEDAR_FORBIDDEN`` (basis FORBIDDEN: a forbid
    policy matched; its ``@reason`` text is in the message) or
    ``CEDAR_NOT_PERMITTED`` (basis NOT_PERMITTED: no permit matched, or the
    execution kind has no action). Rule ids are the policies' ``@id``
    annotations, else Cedar's policy ids. An evaluation error raises
    ``CedarEvaluationError``: the admission seam records it and fails
    closed (unless the policy fails open).
    """

    def __init__(
        self,
        policies: str,
        *,
        name: str = "cedar",
        entities: str | Sequence[Mapping[str, Any]] | cedarpy.Entities | None = None,
        schema: str | Mapping[str, Any] | cedarpy.Schema | None = None,
        strict: bool = False,
        entity_cache: int = 1024,
    ) -> None:
        self.name = name
        self.schema: cedarpy.Schema = _load_schema(schema)
        try:
            self.policy_set: cedarpy.PolicySet = cedarpy.PolicySet.from_str(policies)
        except ValueError as error:
            raise CedarPolicyError(f"the Cedar policies of {name!r} do not parse: {error}") from None
        self._rules = _rules(self.policy_set)
        result = cedarpy.validate_policies(policies, self.schema)
        if not result.validation_passed:
            raise CedarPolicyError(
                f"the Cedar policies of {name!r} do not validate against the schema",
                [
                    f"[{self._rule(error.policy_id).id}] {error.error}" if error.policy_id else error.error
                    for error in result.errors
                ],
            )
        if isinstance(entities, cedarpy.Entities):
            base = entities
        else:
            text = entities if isinstance(entities, str) or entities is None else json.dumps(list(entities))
            try:
                base = cedarpy.Entities.from_json_str(text or "[]", self.schema)
            except ValueError as error:
                raise CedarPolicyError(f"the Cedar entities of {name!r} are not valid: {error}") from None
        self.entities: cedarpy.Entities = base
        # A request's Principal and Target, parsed once per distinct content.
        self._request_entities: Callable[[bytes, bytes], cedarpy.Entities] = functools.lru_cache(
            entity_cache
        )(functools.partial(_parse_entities, base))
        self._request_schema = self.schema if strict else None

    def __repr__(self) -> str:
        return f"CedarPolicy(name={self.name!r}, policies={len(self.policy_set)})"

    def _rule(self, policy_id: str, annotated: Mapping[str, str] | None = None) -> _Rule:
        """The rule of ``policy_id``: its @id and @reason, else the id Cedar
        reports (``annotated`` maps policy ids to @id annotations)."""
        return self._rules.get(policy_id) or _Rule((annotated or {}).get(policy_id) or policy_id, "")

    def __call__(self, envelope: ExecutionEnvelope, /) -> Verdict:
        """Evaluate ``envelope``: Allow, or Deny with PERMISSION_DENIED."""
        action = _contract().actions.get(envelope.execution.kind)
        if action is None:
            return Deny(
                grpc.StatusCode.PERMISSION_DENIED,
                NOT_PERMITTED,
                "no Cedar action exists for an unspecified execution kind",
                BASIS_NOT_PERMITTED,
            )
        request = _request(envelope, action)
        try:
            handle = self._request_entities(
                envelope.principal.SerializeToString(deterministic=True),
                envelope.execution.target.SerializeToString(deterministic=True),
            )
        except ValueError as error:  # e.g. a static entity reuses the request's uid
            raise CedarEvaluationError([f"the request's entities are not valid: {error}"]) from None
        result = cedarpy.is_authorized(request, self.policy_set, handle, schema=self._request_schema)
        diagnostics = result.diagnostics
        if diagnostics.errors or result.decision is cedarpy.Decision.NoDecision:
            raise CedarEvaluationError([self._name_policies(error) for error in diagnostics.errors])
        annotated = diagnostics.id_annotations_by_reason
        rules = [self._rule(policy_id, annotated) for policy_id in diagnostics.reasons]
        ids = tuple(rule.id for rule in rules)
        reasons = "; ".join(rule.reason for rule in rules if rule.reason)
        if result.decision is cedarpy.Decision.Allow:
            return Allow(reasons, ids)
        if rules:
            message = f"forbidden by Cedar policy {', '.join(ids)}" + (f": {reasons}" if reasons else "")
            return Deny(grpc.StatusCode.PERMISSION_DENIED, FORBIDDEN, message, BASIS_FORBIDDEN, ids)
        resource = request["resource"]["id"]
        principal = request["principal"]["id"]
        return Deny(
            grpc.StatusCode.PERMISSION_DENIED,
            NOT_PERMITTED,
            f"no Cedar policy permits {action} on {resource!r} for {principal!r}",
            BASIS_NOT_PERMITTED,
        )

    def _name_policies(self, error: str) -> str:
        """Cedar's error text, with policy ids replaced by their rule ids."""
        return _POLICY_REF.sub(lambda match: f"`{self._rule(match.group(1)).id}`", error)


_COMPACT: Final = (",", ":")
_POLICY_REF: Final = re.compile(r"`(policy\d+)`")
