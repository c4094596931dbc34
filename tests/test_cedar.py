"""Cedar admission policies: the generated schema, load-time validation, and
verdicts through real grpc and grpc.aio servers."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import cedarpy
import grpc
import pytest

from envelope_grpc import EnvelopeConfig, PolicySpec, validate
from envelope_grpc._envelope import QUANTITIES
from envelope_grpc.cedar import (
    CedarEvaluationError,
    CedarPolicy,
    CedarPolicyError,
    _fields,
    _Types,
    cedar_request,
    cedar_schema,
    cedar_schema_json,
)
from envelope_grpc.testing.v1 import testing_pb2 as pb
from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    Binding,
    DataClassification,
    DecisionOutcome,
    DenialBasis,
    EnforcementMode,
    EnvelopeFlag,
    ExecutionEnvelope,
    ExecutionKind,
    Principal,
    PrincipalKind,
    Target,
    Usage,
)
from tests.conftest import Backend, error_info
from tests.test_interceptors import RUN, SERVICE

Start = Callable[..., Backend]
O = DecisionOutcome  # noqa: E741
LONG = {"type": "Long"}
STRING = {"type": "String"}
OPTIONAL_LONG = {"type": "Long", "required": False}


def set_of(element: Mapping[str, object]) -> dict[str, object]:
    return {"type": "Set", "element": element}


PAIRS = set_of({"type": "Record", "attributes": {"key": STRING, "value": STRING}})

PERMIT = """
@id("acme-small-inference")
@reason("acme may run inference on up to 4 accelerators")
permit (principal, action == EnvelopeGrpc::Action::"inference", resource)
when {
  principal.tenant == "acme" &&
  context.requested has accelerator_count &&
  context.requested.accelerator_count <= 4
};
"""
FORBID = """
@id("no-restricted-eu")
@reason("restricted data may not be processed in the EU")
forbid (principal, action, resource)
when { context.scope.data_classification == "restricted" && context.scope.region like "eu-*" };
"""
# Valid against the schema, but overflows at evaluation for any token count above 1.
OVERFLOW = """
@id("token-overflow")
permit (principal, action, resource)
when { context.requested has tokens && context.requested.tokens * 9223372036854775807 > 0 };
"""


def schema() -> dict[str, Any]:
    body: dict[str, Any] = cedar_schema_json()["EnvelopeGrpc"]
    return body


def attributes_of(shape: dict[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = shape["attributes"]
    return attributes


def full_envelope() -> ExecutionEnvelope:
    env = ExecutionEnvelope()
    env.principal.CopyFrom(
        Principal(
            subject="alice",
            kind=PrincipalKind.PRINCIPAL_KIND_USER,
            tenant="acme",
            project="search",
            roles=["ml-engineer", "oncall"],
            auth_method=AuthMethod.AUTH_METHOD_JWT,
            on_behalf_of=["bob"],
            source_address="ipv4:10.0.0.1:5000",
            user_agent="grpc-python/1.81",
            issuer="https://idp.example",
        )
    )
    env.execution.kind = ExecutionKind.EXECUTION_KIND_INFERENCE
    env.execution.method = f"{SERVICE}/Run"
    env.execution.target.CopyFrom(
        Target(type="model", name="llama-3-8b", version="7", attributes={"engine": "vllm"})
    )
    env.requested.accelerator_count = 2
    env.requested.accelerator_type = "nvidia-a100"
    env.requested.tokens = 512
    env.scope.data_classification = DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL
    env.scope.region = "eu-west"
    env.scope.purpose = "support"
    env.scope.datasets.extend(["wiki", "books"])
    env.scope.hints["purpose"] = "support-bot"
    env.scope.policy_refs.append("gdpr")
    env.lineage.depth = 2
    env.flags.append(EnvelopeFlag.ENVELOPE_FLAG_DRY_RUN_DENY)
    return env


# -- the generated schema ------------------------------------------------------------------


def test_schema_entities_follow_the_contract() -> None:
    entities = schema()["entityTypes"]
    principal = attributes_of(entities["Principal"]["shape"])
    assert set(principal) == {field.name for field in Principal.DESCRIPTOR.fields}
    assert principal["tenant"] == STRING
    assert principal["subject"] == STRING
    assert principal["kind"] == STRING
    assert principal["auth_method"] == STRING
    assert principal["roles"] == set_of(STRING)
    assert principal["on_behalf_of"] == set_of(STRING)
    target = entities["Target"]
    assert attributes_of(target["shape"]) == {"type": STRING, "name": STRING, "version": STRING}
    assert target["tags"] == STRING  # Target.attributes, a map<string, string>


def test_schema_context_follows_the_contract() -> None:
    common = schema()["commonTypes"]
    resources = attributes_of(common["Resources"])
    assert set(QUANTITIES) < set(resources)
    for quantity in QUANTITIES:
        assert resources[quantity] == OPTIONAL_LONG, quantity
    assert resources["accelerator_type"] == STRING
    assert attributes_of(common["Context"]) == {
        "method": STRING,
        "requested": {"type": "Resources"},
        "scope": {"type": "Scope"},
        "lineage": {"type": "Lineage"},
        "flags": set_of(STRING),
    }
    scope = attributes_of(common["Scope"])
    assert scope["data_classification"] == STRING
    assert scope["datasets"] == set_of(STRING)
    assert scope["hints"] == PAIRS
    assert attributes_of(common["Lineage"])["depth"] == LONG


def test_every_execution_kind_but_unspecified_is_an_action() -> None:
    actions = schema()["actions"]
    expected = {
        value.name.removeprefix("EXECUTION_KIND_").lower()
        for value in ExecutionKind.DESCRIPTOR.values
        if value.number != ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    }
    assert set(actions) == expected
    assert {"inference", "deployment", "data_movement", "agent_workflow"} <= expected
    assert actions["inference"] == {
        "appliesTo": {
            "principalTypes": ["Principal"],
            "resourceTypes": ["Target"],
            "context": {"type": "Context"},
        }
    }


def test_schema_text_is_the_same_schema() -> None:
    text = cedar_schema()
    assert "namespace EnvelopeGrpc" in text
    assert "tokens?: __cedar::Long" in text
    assert 'action "data_movement"' in text
    assert str(cedarpy.Schema.from_str(text)) == text
    copy = cedar_schema_json()
    copy["EnvelopeGrpc"]["actions"].clear()
    assert schema()["actions"], "cedar_schema_json must hand out copies"


def test_the_walk_types_any_contract_message() -> None:
    usage, _ = _fields(Usage.DESCRIPTOR, _Types())
    assert {field.name: (field.cedar, field.optional) for field in usage} == {
        field.name: (LONG, True) for field in Usage.DESCRIPTOR.fields
    }
    binding, _ = _fields(Binding.DESCRIPTOR, _Types())
    typed = {field.name: field.cedar for field in binding}
    assert typed["accelerator_indexes"] == set_of(LONG)
    assert typed["attributes"] == PAIRS


# -- requests --------------------------------------------------------------------------------


def test_a_full_request_conforms_to_the_schema() -> None:
    request, entities = cedar_request(full_envelope())
    assert request["principal"] == {"type": "EnvelopeGrpc::Principal", "id": "alice"}
    assert request["action"] == {"type": "EnvelopeGrpc::Action", "id": "inference"}
    assert request["resource"] == {"type": "EnvelopeGrpc::Target", "id": "model/llama-3-8b"}
    context = request["context"]
    assert context["requested"] == {"accelerator_count": 2, "accelerator_type": "nvidia-a100", "tokens": 512}
    assert context["scope"]["data_classification"] == "confidential"
    assert context["scope"]["hints"] == [{"key": "purpose", "value": "support-bot"}]
    assert context["lineage"]["depth"] == 2
    assert context["flags"] == ["dry_run_deny"]
    principal, target = entities
    assert principal["attrs"]["kind"] == "user"
    assert principal["attrs"]["auth_method"] == "jwt"
    assert target["tags"] == {"engine": "vllm"}
    # Cedar itself checks request and entities against the schema here.
    result = cedarpy.is_authorized(request, "permit (principal, action, resource);", entities, cedar_schema())
    assert (result.allowed, result.diagnostics.errors) == (True, [])


def test_an_empty_request_conforms_to_the_schema() -> None:
    env = ExecutionEnvelope()
    env.execution.kind = ExecutionKind.EXECUTION_KIND_TRAINING
    request, entities = cedar_request(env)
    assert request["principal"]["id"] == "anonymous"
    assert request["context"]["requested"] == {"accelerator_type": ""}
    result = cedarpy.is_authorized(request, "permit (principal, action, resource);", entities, cedar_schema())
    assert (result.allowed, result.diagnostics.errors) == (True, [])
    with pytest.raises(ValueError, match="no Cedar action"):
        cedar_request(ExecutionEnvelope())


# -- load-time validation ----------------------------------------------------------------


def test_a_typo_in_an_attribute_is_refused_at_construction() -> None:
    with pytest.raises(CedarPolicyError) as caught:
        CedarPolicy('@id("typo") permit (principal, action, resource) when { principal.tenat == "acme" };')
    assert isinstance(caught.value, ValueError)
    (error,) = caught.value.errors
    assert error.startswith("[typo] ")
    assert "`tenat`" in error
    assert "tenat" in str(caught.value)


def test_an_unknown_action_and_an_unguarded_optional_are_refused_together() -> None:
    with pytest.raises(CedarPolicyError) as caught:
        CedarPolicy(
            'permit (principal, action == EnvelopeGrpc::Action::"infer", resource);\n'
            '@id("no-has") permit (principal, action, resource) when { context.requested.tokens < 10 };',
            name="mine",
        )
    message = str(caught.value)
    assert "'mine'" in message
    assert 'unrecognized action `EnvelopeGrpc::Action::"infer"`' in message
    assert any(e.startswith("[no-has] ") and "optional attribute" in e for e in caught.value.errors)


def test_unknown_entity_types_and_parse_errors_are_refused() -> None:
    with pytest.raises(CedarPolicyError, match="User"):
        CedarPolicy('permit (principal == EnvelopeGrpc::User::"alice", action, resource);')
    with pytest.raises(CedarPolicyError, match="do not parse"):
        CedarPolicy("permit (principal, action, resource) when {")
    with pytest.raises(CedarPolicyError, match="entities"):
        CedarPolicy(PERMIT, entities=[{"uid": {"type": "EnvelopeGrpc::Nope", "id": "x"}, "attrs": {}}])


# -- verdicts without a server ----------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_verdicts(strict: bool) -> None:
    policy = CedarPolicy(PERMIT + FORBID, strict=strict)
    env = full_envelope()
    allowed = policy(env)
    assert allowed == policy(env)  # the second call reuses the cached entities
    assert allowed.rule_ids == ("acme-small-inference",)
    assert allowed.message == "acme may run inference on up to 4 accelerators"

    env.scope.data_classification = DataClassification.DATA_CLASSIFICATION_RESTRICTED
    forbidden = policy(env)
    assert (forbidden.reason_code, forbidden.basis, forbidden.rule_ids) == (  # type: ignore[union-attr]
        "CEDAR_FORBIDDEN",
        DenialBasis.DENIAL_BASIS_FORBIDDEN,
        ("no-restricted-eu",),
    )

    env.scope.data_classification = DataClassification.DATA_CLASSIFICATION_PUBLIC
    env.requested.accelerator_count = 8
    refused = policy(env)
    assert (refused.reason_code, refused.basis, refused.rule_ids) == (  # type: ignore[union-attr]
        "CEDAR_NOT_PERMITTED",
        DenialBasis.DENIAL_BASIS_NOT_PERMITTED,
        (),
    )

    env.execution.kind = ExecutionKind.EXECUTION_KIND_UNSPECIFIED
    assert policy(env).reason_code == "CEDAR_NOT_PERMITTED"  # type: ignore[union-attr]


def test_tags_hints_and_unannotated_ids() -> None:
    policy = CedarPolicy(
        'permit (principal, action, resource) when { resource.hasTag("engine") && '
        'resource.getTag("engine") == "vllm" && '
        'context.scope.hints.contains({key: "purpose", value: "support-bot"}) };'
    )
    env = full_envelope()
    assert policy(env).rule_ids == ("policy0",)
    env.execution.target.attributes["engine"] = "triton"
    assert policy(env).reason_code == "CEDAR_NOT_PERMITTED"  # type: ignore[union-attr]


def test_an_evaluation_error_raises_instead_of_denying() -> None:
    policy = CedarPolicy(FORBID + OVERFLOW)
    with pytest.raises(CedarEvaluationError, match=r"`token-overflow`.*overflow") as caught:
        policy(full_envelope())
    assert len(caught.value.errors) == 1


def test_an_entity_colliding_with_a_request_entity_raises() -> None:
    alice = {"uid": {"type": "EnvelopeGrpc::Principal", "id": "alice"}, "attrs": {}, "parents": []}
    policy = CedarPolicy(PERMIT, entities=[], schema=cedar_schema())
    assert policy(full_envelope()).rule_ids == ("acme-small-inference",)
    with pytest.raises(CedarPolicyError):  # not a full Principal: refused against the schema
        CedarPolicy(PERMIT, entities=[alice])
    colliding = CedarPolicy(PERMIT, entities=cedarpy.Entities.from_json_str(json.dumps([alice])))
    with pytest.raises(CedarEvaluationError, match=r"not valid.*alice"):
        colliding(full_envelope())


# -- through real servers ----------------------------------------------------------------------


def cedar_backend(backend: Start, *specs: CedarPolicy | PolicySpec) -> Backend:
    return backend(EnvelopeConfig(policies=list(specs)))


def test_a_permit_lets_the_call_through(backend: Start) -> None:
    server = cedar_backend(backend, CedarPolicy(PERMIT + FORBID))
    response = server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert response.envelope_id == env.envelope_id
    assert env.decision.outcome == O.DECISION_OUTCOME_ADMITTED
    (verdict,) = env.decision.policies
    assert (verdict.policy, verdict.outcome) == ("cedar", O.DECISION_OUTCOME_ADMITTED)
    assert list(verdict.rule_ids) == ["acme-small-inference"]
    assert verdict.error == ""
    assert validate(env) == []


def test_a_forbid_denies_with_its_id_and_reason(backend: Start) -> None:
    server = cedar_backend(backend, CedarPolicy(PERMIT + FORBID))
    restricted = pb.RunRequest()
    restricted.CopyFrom(RUN)
    restricted.classification = "restricted"
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(restricted)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "restricted data may not be processed in the EU" in (caught.value.details() or "")
    info = error_info(caught.value)
    assert info.reason == "CEDAR_FORBIDDEN"
    assert info.metadata["policy"] == "cedar"
    (env,) = server.envelopes(1)
    decision = env.decision
    assert decision.outcome == O.DECISION_OUTCOME_DENIED
    assert decision.denial_basis == DenialBasis.DENIAL_BASIS_FORBIDDEN
    assert (decision.deciding_policy, decision.reason_code) == ("cedar", "CEDAR_FORBIDDEN")
    assert "restricted data may not be processed in the EU" in decision.message
    assert list(decision.policies[0].rule_ids) == ["no-restricted-eu"]
    assert validate(env) == []


def test_nothing_permitting_denies_as_not_permitted(backend: Start) -> None:
    server = cedar_backend(backend, CedarPolicy(PERMIT + FORBID))
    large = pb.RunRequest()
    large.CopyFrom(RUN)
    large.accelerators.count = 8
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(large)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "CEDAR_NOT_PERMITTED"
    with pytest.raises(grpc.RpcError) as unmapped:
        server.stub.Ping(pb.PingRequest(text="hi"))
    assert error_info(unmapped.value).reason == "CEDAR_NOT_PERMITTED"
    for env in server.envelopes(2):
        assert env.decision.denial_basis == DenialBasis.DENIAL_BASIS_NOT_PERMITTED
        assert env.decision.reason_code == "CEDAR_NOT_PERMITTED"
        assert list(env.decision.policies[0].rule_ids) == []
        assert validate(env) == []


def test_dry_run_records_the_deny_it_would_make(backend: Start) -> None:
    server = cedar_backend(backend, PolicySpec(CedarPolicy(PERMIT + FORBID), dry_run=True))
    restricted = pb.RunRequest()
    restricted.CopyFrom(RUN)
    restricted.classification = "restricted"
    server.stub.Run(restricted)
    (env,) = server.envelopes(1)
    assert env.decision.outcome == O.DECISION_OUTCOME_ADMITTED
    assert env.decision.mode == EnforcementMode.ENFORCEMENT_MODE_DRY_RUN
    (verdict,) = env.decision.policies
    assert (verdict.outcome, verdict.mode, verdict.reason_code) == (
        O.DECISION_OUTCOME_DENIED,
        EnforcementMode.ENFORCEMENT_MODE_DRY_RUN,
        "CEDAR_FORBIDDEN",
    )
    assert list(verdict.rule_ids) == ["no-restricted-eu"]
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_DRY_RUN_DENY]
    assert validate(env) == []


def test_an_evaluation_error_fails_closed_as_a_policy_error(backend: Start) -> None:
    server = cedar_backend(backend, CedarPolicy(FORBID + OVERFLOW))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Run(RUN)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "POLICY_ERROR"
    (env,) = server.envelopes(1)
    (verdict,) = env.decision.policies
    assert verdict.error.startswith("CedarEvaluationError: ")
    assert "`token-overflow`" in verdict.error
    assert "integer overflow" in verdict.error
    assert env.decision.reason_code == "POLICY_ERROR"
    assert env.decision.denial_basis == DenialBasis.DENIAL_BASIS_ERROR
    assert validate(env) == []


def test_an_evaluation_error_may_fail_open(backend: Start) -> None:
    server = cedar_backend(backend, PolicySpec(CedarPolicy(OVERFLOW), fail_open=True))
    server.stub.Run(RUN)
    (env,) = server.envelopes(1)
    assert env.decision.policies[0].fail_open
    assert "`token-overflow`" in env.decision.policies[0].error
    assert list(env.flags) == [EnvelopeFlag.ENVELOPE_FLAG_FAIL_OPEN]
    assert validate(env) == []
