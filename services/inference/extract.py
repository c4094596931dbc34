"""How KServe v2 requests map into execution envelopes.

The proto is NVIDIA's / KServe's (shipped by tritonclient), not ours, so the
mapping is plain functions registered by full method name.

``ModelInfer`` (EXECUTION_KIND_INFERENCE, target type "model"):

- target name and version: ``model_name`` and ``model_version`` as asked (an
  empty version means "the latest"; the version actually served is in the
  binding's ``model_version`` attribute);
- target attribute ``batch_size``: the first dimension of the first input's
  shape;
- requested BYTES: the input payload, i.e. the total length of
  ``raw_input_contents``, or, for typed ``contents``, element count x datatype
  size (BYTES elements: their lengths plus the 4-byte prefix each would have
  raw), so both encodings of one tensor ask for the same amount;
- requested TOKENS: the ``max_tokens`` parameter (int64 or uint64) is per
  input string, so the request asks for ``max_tokens`` x batch size tokens;
  unset when the parameter is absent, negative or not an integer;
- requested CONCURRENCY: left unset. One ModelInfer call is one execution of
  one batch; the batch's size is already recorded (``batch_size``) and its
  cost is in BYTES and TOKENS. Writing concurrency 1 would invent an ask the
  caller never made, and writing the batch size would count it twice;
- tenant: the ``tenant`` string parameter, when the identity resolvers left
  the tenant empty.

``ModelMetadata`` and ``ModelReady`` are EXECUTION_KIND_CONTROL with the model
as target. ``ServerLive``, ``ServerReady`` and ``ServerMetadata`` are recorded
too, as EXECUTION_KIND_CONTROL on target type "server": a service cannot
declare a method skipped through ``services._runtime.Service`` (only the
EnvelopeConfig's ExtractorRegistry rules can), and a probe's envelope is
cheap. Deployments that poll them often can pass
``ExtractorRegistry(rules=SKIPPABLE)`` to skip them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

import envelope_grpc
from envelope_grpc import Extraction
from envelope_grpc.v1.envelope_pb2 import ExecutionKind
from services.inference.tensors import TensorError, contents_bytes

SERVICE: Final = "inference.GRPCInferenceService"
MODEL_INFER: Final = f"/{SERVICE}/ModelInfer"
MODEL_METADATA: Final = f"/{SERVICE}/ModelMetadata"
MODEL_READY: Final = f"/{SERVICE}/ModelReady"
SERVER_LIVE: Final = f"/{SERVICE}/ServerLive"
SERVER_READY: Final = f"/{SERVICE}/ServerReady"
SERVER_METADATA: Final = f"/{SERVICE}/ServerMetadata"

#: Rules for ExtractorRegistry that skip the server probes.
SKIPPABLE: Final[Mapping[str, envelope_grpc.Action]] = {
    SERVER_LIVE: envelope_grpc.Action.SKIP,
    SERVER_READY: envelope_grpc.Action.SKIP,
}

#: The target name of server-level calls.
SERVER_TARGET: Final = "inference"

_INFERENCE: Final = ExecutionKind.EXECUTION_KIND_INFERENCE
_CONTROL: Final = ExecutionKind.EXECUTION_KIND_CONTROL


def int_parameter(parameters: Any, key: str) -> int | None:
    """An integer InferParameter (int64 or uint64), or None when absent or
    of another type."""
    if key not in parameters:
        return None
    parameter = parameters[key]
    which = parameter.WhichOneof("parameter_choice")
    if which == "int64_param":
        return int(parameter.int64_param)
    if which == "uint64_param":
        return int(parameter.uint64_param)
    return None


def string_parameter(parameters: Any, key: str) -> str:
    """A string InferParameter, or "" when absent or of another type."""
    if key not in parameters:
        return ""
    parameter = parameters[key]
    return str(parameter.string_param) if parameter.WhichOneof("parameter_choice") == "string_param" else ""


def batch_size(request: Any) -> int | None:
    """The first dimension of the first input's shape, if there is one."""
    if not request.inputs or not request.inputs[0].shape:
        return None
    return int(request.inputs[0].shape[0])


def input_bytes(request: Any) -> int | None:
    """The payload size of a ModelInferRequest's inputs (see the module doc)."""
    if request.raw_input_contents:
        return sum(len(raw) for raw in request.raw_input_contents)
    try:
        return sum(contents_bytes(tensor) for tensor in request.inputs)
    except TensorError:
        return None


def extract_model_infer(request: Message) -> Extraction:
    """A ModelInferRequest's envelope fields."""
    if not isinstance(request, service_pb2.ModelInferRequest):
        raise TypeError(f"expected a ModelInferRequest, got {type(request).__name__}")
    found = Extraction(kind=_INFERENCE)
    target = found.target
    target.type = "model"
    target.name = request.model_name
    target.version = request.model_version
    batch = batch_size(request)
    if batch is not None:
        target.attributes["batch_size"] = str(batch)
    size = input_bytes(request)
    if size is not None:
        found.requested.bytes = size
    max_tokens = int_parameter(request.parameters, "max_tokens")
    if max_tokens is not None and max_tokens >= 0:
        found.requested.tokens = max_tokens * (batch if batch is not None and batch > 0 else 1)
    found.tenant = string_parameter(request.parameters, "tenant")
    return found


def extract_model_control(request: Message) -> Extraction:
    """A ModelMetadataRequest's or ModelReadyRequest's envelope fields."""
    found = Extraction(kind=_CONTROL)
    found.target.type = "model"
    found.target.name = getattr(request, "name", "")
    found.target.version = getattr(request, "version", "")
    return found


def extract_server_control(request: Message) -> Extraction:
    """A server probe's envelope fields."""
    found = Extraction(kind=_CONTROL)
    found.target.type = "server"
    found.target.name = SERVER_TARGET
    return found


def extractors() -> list[tuple[str, envelope_grpc.Extractor]]:
    """Every extractor of the inference service, by full method name."""
    return [
        (MODEL_INFER, extract_model_infer),
        (MODEL_METADATA, extract_model_control),
        (MODEL_READY, extract_model_control),
        (SERVER_LIVE, extract_server_control),
        (SERVER_READY, extract_server_control),
        (SERVER_METADATA, extract_server_control),
    ]
