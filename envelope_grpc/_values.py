"""Enum values of the contract as module constants.

Reading ``Enum.NAME`` on a generated enum wrapper goes through a slow
``__getattr__``; the hot paths use these constants instead.
"""

from __future__ import annotations

import re
from typing import Final

from google.protobuf.descriptor import EnumDescriptor

from envelope_grpc.v1.envelope_pb2 import (
    AuthMethod,
    DecisionOutcome,
    DenialBasis,
    EnforcementMode,
    EnvelopeFlag,
    GrantStage,
    PrincipalKind,
    ResourceDimension,
)

OUTCOME_UNSPECIFIED: Final = DecisionOutcome.DECISION_OUTCOME_UNSPECIFIED
OUTCOME_ADMITTED: Final = DecisionOutcome.DECISION_OUTCOME_ADMITTED
OUTCOME_NARROWED: Final = DecisionOutcome.DECISION_OUTCOME_NARROWED
OUTCOME_WIDENED: Final = DecisionOutcome.DECISION_OUTCOME_WIDENED
OUTCOME_ADJUSTED: Final = DecisionOutcome.DECISION_OUTCOME_ADJUSTED
OUTCOME_DENIED: Final = DecisionOutcome.DECISION_OUTCOME_DENIED

MODE_ENFORCE: Final = EnforcementMode.ENFORCEMENT_MODE_ENFORCE
MODE_DRY_RUN: Final = EnforcementMode.ENFORCEMENT_MODE_DRY_RUN

BASIS_FORBIDDEN: Final = DenialBasis.DENIAL_BASIS_FORBIDDEN
BASIS_NOT_PERMITTED: Final = DenialBasis.DENIAL_BASIS_NOT_PERMITTED
BASIS_EXHAUSTED: Final = DenialBasis.DENIAL_BASIS_EXHAUSTED
BASIS_INVALID: Final = DenialBasis.DENIAL_BASIS_INVALID
BASIS_ERROR: Final = DenialBasis.DENIAL_BASIS_ERROR

STAGE_ADMISSION: Final = GrantStage.GRANT_STAGE_ADMISSION
STAGE_BACKEND: Final = GrantStage.GRANT_STAGE_BACKEND

FLAG_PEER_ENVELOPE_UNTRUSTED: Final = EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_UNTRUSTED
FLAG_PEER_ENVELOPE_MALFORMED: Final = EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_MALFORMED
FLAG_PEER_ENVELOPE_OVERSIZED: Final = EnvelopeFlag.ENVELOPE_FLAG_PEER_ENVELOPE_OVERSIZED
FLAG_GATEWAY_HEADERS_UNTRUSTED: Final = EnvelopeFlag.ENVELOPE_FLAG_GATEWAY_HEADERS_UNTRUSTED
FLAG_FAIL_OPEN: Final = EnvelopeFlag.ENVELOPE_FLAG_FAIL_OPEN
FLAG_EXTRACTION_FAILED: Final = EnvelopeFlag.ENVELOPE_FLAG_EXTRACTION_FAILED
FLAG_DRY_RUN_DENY: Final = EnvelopeFlag.ENVELOPE_FLAG_DRY_RUN_DENY

PRINCIPAL_ANONYMOUS: Final = PrincipalKind.PRINCIPAL_KIND_ANONYMOUS
PRINCIPAL_USER: Final = PrincipalKind.PRINCIPAL_KIND_USER
PRINCIPAL_SERVICE: Final = PrincipalKind.PRINCIPAL_KIND_SERVICE
PRINCIPAL_AGENT: Final = PrincipalKind.PRINCIPAL_KIND_AGENT

AUTH_NONE: Final = AuthMethod.AUTH_METHOD_NONE
AUTH_JWT: Final = AuthMethod.AUTH_METHOD_JWT
AUTH_MTLS: Final = AuthMethod.AUTH_METHOD_MTLS
AUTH_GATEWAY: Final = AuthMethod.AUTH_METHOD_GATEWAY

DIMENSION_ACCELERATOR_TYPE: Final = ResourceDimension.RESOURCE_DIMENSION_ACCELERATOR_TYPE


def enum_names(enum: EnumDescriptor) -> dict[int, str]:
    """Value number -> lowercase name without the enum's prefix
    (ExecutionKind.EXECUTION_KIND_INFERENCE -> "inference")."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    if not all(value.name.startswith(prefix) for value in enum.values):
        prefix = ""
    return {value.number: value.name[len(prefix) :].lower() for value in enum.values}
