"""The KServe v2 / Open Inference Protocol servicer over the built-in models.

It implements the ``inference.GRPCInferenceService`` that tritonclient ships
stubs for (so ``tritonclient.grpc.InferenceServerClient`` talks to it):
ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata and
ModelInfer. The other methods answer UNIMPLEMENTED.

In ModelInfer the backend's steps go into the call's envelope: for
token-limited models a final grant when the caller asked for tokens (the
model's own limit and the admission grant can narrow it), always a binding
(node, runtime "numpy", the model's v2 route as endpoint), and the tokens
actually consumed or produced as usage.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any, Final

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

import envelope_grpc
from envelope_grpc.v1.envelope_pb2 import Binding, Usage
from services._handler import abort, admission_grant, starting_grant
from services.inference.extract import int_parameter
from services.inference.models import Array, Model, Repository, TensorSpec, default_repository
from services.inference.tensors import TensorError, decode_inputs, encode_output

SERVER_NAME: Final = "envelope-grpc-inference"
SERVER_VERSION: Final = "1.0"


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _spec(spec: TensorSpec) -> str:
    return f"'{spec.name}' ({spec.datatype}, shape {_shape(spec.shape)})"


def check_inputs(model: Model, request: Any, inputs: Mapping[str, Array]) -> int:
    """Check decoded inputs against the model's metadata; returns the batch
    size. Raises TensorError with a message for the caller."""
    label = f"model '{model.name}' version {model.version}"
    declared = {tensor.name: tensor.datatype for tensor in request.inputs}
    expected = {spec.name: spec for spec in model.inputs}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise TensorError(f"{label} has no input {names}; it takes {', '.join(map(_spec, model.inputs))}")
    batch: int | None = None
    for spec in model.inputs:
        if spec.name not in inputs:
            raise TensorError(f"{label} needs input {_spec(spec)}")
        if declared[spec.name] != spec.datatype:
            raise TensorError(
                f"{label} input '{spec.name}' must be {spec.datatype}, got {declared[spec.name]}"
            )
        shape = inputs[spec.name].shape
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise TensorError(
                f"{label} input '{spec.name}' must have shape {_shape(spec.shape)}, got {_shape(shape)}"
            )
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise TensorError(f"{label}: inputs disagree on the batch size ({batch} and {shape[0]})")
    if not batch:
        raise TensorError(f"{label}: the batch is empty")
    return batch


def requested_outputs(model: Model, request: Any) -> list[TensorSpec]:
    """The outputs to send: those requested, or all of them."""
    if not request.outputs:
        return list(model.outputs)
    by_name = {spec.name: spec for spec in model.outputs}
    chosen: list[TensorSpec] = []
    for output in request.outputs:
        spec = by_name.get(output.name)
        if spec is None:
            raise TensorError(
                f"model '{model.name}' has no output '{output.name}'; it has {', '.join(sorted(by_name))}"
            )
        chosen.append(spec)
    return chosen


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """KServe v2 over a model repository."""

    def __init__(self, repository: Repository | None = None, *, node: str | None = None) -> None:
        self.repository = repository or default_repository()
        self.node = node or socket.gethostname()

    # -- probes and metadata -----------------------------------------------------------

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready when the model (and version) exists: a readiness question about
        an unknown model has an answer, "not ready", rather than an error."""
        return service_pb2.ModelReadyResponse(
            ready=self.repository.get(request.name, request.version) is not None
        )

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._model(request.name, request.version, context)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=model.name,
            versions=[model.version] if request.version else self.repository.versions(model.name),
            platform=model.platform,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.outputs],
        )

    # -- inference ---------------------------------------------------------------------

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._model(request.model_name, request.model_version, context)
        try:
            inputs = decode_inputs(request)
            batch = check_inputs(model, request, inputs)
            outputs = requested_outputs(model, request)
        except TensorError as error:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        max_tokens = self._max_tokens(model, request, batch, context)
        if envelope_grpc.current_envelope() is not None:
            envelope_grpc.record_binding(
                Binding(
                    node=self.node,
                    runtime=model.platform,
                    endpoint=f"v2/models/{model.name}/versions/{model.version}",
                    attributes={"model_version": model.version},
                )
            )
        result = model.run(inputs, max_tokens)
        if result.tokens is not None and envelope_grpc.current_envelope() is not None:
            envelope_grpc.record_usage(Usage(tokens=result.tokens))
        response = service_pb2.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        for spec in outputs:
            encode_output(response, spec.name, spec.datatype, result.outputs[spec.name])
        return response

    def _model(self, name: str, version: str, context: grpc.ServicerContext) -> Model:
        model = self.repository.get(name, version)
        if model is not None:
            return model
        known = self.repository.versions(name)
        if not known:
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"unknown model '{name}'; models: {', '.join(self.repository.names())}",
            )
        abort(
            context,
            grpc.StatusCode.NOT_FOUND,
            f"model '{name}' has no version '{version}'; versions: {', '.join(known)}",
        )

    def _max_tokens(
        self, model: Model, request: Any, batch: int, context: grpc.ServicerContext
    ) -> int | None:
        """Tokens per input string for a token-limited model, with the final
        grant recorded when the caller asked for tokens."""
        limit = model.token_limit
        if limit is None:
            return None
        asked = int_parameter(request.parameters, "max_tokens")
        if asked is None:
            if "max_tokens" in request.parameters:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "parameter 'max_tokens' must be an integer")
            return model.default_tokens
        if asked < 0:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"parameter 'max_tokens' is negative ({asked})")
        per_input = min(asked, limit)
        env = envelope_grpc.current_envelope()
        if env is None:
            return per_input
        # The grant starts from what admission granted; a reason is kept only
        # when the grant differs from the request.
        admission = admission_grant(env)
        granted = starting_grant(env)
        reason_code, reason = "MAX_TOKENS_APPLIED", f"{per_input} tokens for each of {batch} inputs"
        if admission is not None and admission.reason_code:
            reason_code, reason = admission.reason_code, admission.reason
        if asked > limit:
            reason_code = "MODEL_MAX_TOKENS"
            reason = f"{model.name} handles at most {limit} tokens per input; {asked} asked"
        if admission is not None and admission.resources.HasField("tokens"):
            admitted = admission.resources.tokens // batch
            if admitted < per_input:
                per_input = admitted
                reason_code = admission.reason_code or "ADMISSION_LIMIT"
                reason = admission.reason or f"admission granted {admission.resources.tokens} tokens"
        granted.tokens = per_input * batch
        envelope_grpc.record_grant(granted, reason_code=reason_code, reason=reason)
        return per_input
