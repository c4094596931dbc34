"""Every name the library puts on the wire or on a span, in one place."""

from __future__ import annotations

from typing import Final

#: gRPC metadata carrying a caller's compact envelope (EnvelopeContext).
ENVELOPE_METADATA: Final = "x-execution-envelope-bin"
#: Trailing metadata naming the call's envelope.
ENVELOPE_ID_METADATA: Final = "x-execution-envelope-id"
#: Trailing metadata with the admission outcome ("admitted", "narrowed", "denied", ...).
DECISION_METADATA: Final = "x-execution-envelope-decision"
#: A caller's request id; a fresh one is made when it is absent.
REQUEST_ID_METADATA: Final = "x-request-id"
#: The ErrorInfo domain of denials.
ERROR_DOMAIN: Final = "envelope-grpc"
#: Largest accepted inbound EnvelopeContext, in bytes.
MAX_PEER_ENVELOPE_BYTES: Final = 512

#: Namespace of every span attribute, span event and metric.
NAMESPACE: Final = "execution_envelope"

# Span attribute keys, one table (see _telemetry.attributes).
ATTR_ID: Final = f"{NAMESPACE}.id"
ATTR_REQUEST_ID: Final = f"{NAMESPACE}.request_id"
ATTR_PARENT_ID: Final = f"{NAMESPACE}.parent_id"
ATTR_ROOT_ID: Final = f"{NAMESPACE}.root_id"
ATTR_DEPTH: Final = f"{NAMESPACE}.depth"
ATTR_KIND: Final = f"{NAMESPACE}.kind"
ATTR_TARGET_TYPE: Final = f"{NAMESPACE}.target.type"
ATTR_TARGET_NAME: Final = f"{NAMESPACE}.target.name"
ATTR_TARGET_VERSION: Final = f"{NAMESPACE}.target.version"
ATTR_SUBJECT: Final = f"{NAMESPACE}.principal.subject"
ATTR_PRINCIPAL_KIND: Final = f"{NAMESPACE}.principal.kind"
ATTR_TENANT: Final = f"{NAMESPACE}.principal.tenant"
ATTR_PROJECT: Final = f"{NAMESPACE}.principal.project"
ATTR_AUTH: Final = f"{NAMESPACE}.principal.auth_method"
ATTR_CLASSIFICATION: Final = f"{NAMESPACE}.scope.data_classification"
ATTR_REGION: Final = f"{NAMESPACE}.scope.region"
ATTR_OUTCOME: Final = f"{NAMESPACE}.decision.outcome"
ATTR_POLICY: Final = f"{NAMESPACE}.decision.policy"
ATTR_REASON: Final = f"{NAMESPACE}.decision.reason_code"
ATTR_MODE: Final = f"{NAMESPACE}.decision.mode"
ATTR_FAIL_OPEN: Final = f"{NAMESPACE}.decision.fail_open"
ATTR_STATE: Final = f"{NAMESPACE}.state"
#: Every state the envelope went through, in order, each with the
#: microseconds from receipt: "received:0 normalized:41 admitted:63 completed:118".
ATTR_LIFECYCLE: Final = f"{NAMESPACE}.lifecycle"
ATTR_FLAGS: Final = f"{NAMESPACE}.flags"
ATTR_REQUESTED_PREFIX: Final = f"{NAMESPACE}.requested."
ATTR_GRANTED_PREFIX: Final = f"{NAMESPACE}.granted."
ATTR_BINDING_NODE: Final = f"{NAMESPACE}.binding.node"
ATTR_BINDING_ENDPOINT: Final = f"{NAMESPACE}.binding.endpoint"
ATTR_USAGE_PREFIX: Final = f"{NAMESPACE}.usage."

# Metric names.
METRIC_ADMISSIONS: Final = f"{NAMESPACE}.admissions"
METRIC_REQUESTED: Final = f"{NAMESPACE}.resources.requested"
METRIC_GRANTED: Final = f"{NAMESPACE}.resources.granted"

# Actors named in lifecycle transitions.
ACTOR_RECEIVER: Final = "receiver"
ACTOR_EXTRACTOR: Final = "extractor"
ACTOR_ADMISSION: Final = "admission"
ACTOR_BACKEND: Final = "backend"
ACTOR_COMPLETION: Final = "completion"

#: Entries a map of the contract holds at most (target attributes, scope hints).
MAX_MAP_ENTRIES: Final = 32

#: Methods that build no envelope unless configured otherwise.
DEFAULT_SKIPPED: Final = (
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1.ServerReflection/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
)
