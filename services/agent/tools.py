"""The agent's tools: downstream calls to the inference service.

``tritonclient.grpc.InferenceServerClient`` builds its own channel (it takes
no channel and no interceptors; only header plugins) and returns just the
decoded result, never the call's trailing metadata, where the downstream
envelope id is. So the tools use tritonclient's generated stub,
``service_pb2_grpc.GRPCInferenceServiceStub``, on a channel wrapped with
OpenTelemetry's client interceptor (``grpcext.intercept_channel``: spans and
W3C trace context) and ``envelope_grpc.EnvelopeClientInterceptor`` (the
caller's envelope as lineage), call ``ModelInfer.with_call`` to read the
trailing ``x-execution-envelope-id``, and decode the response with
tritonclient's own ``InferResult``.

Calls must be made inside an intercepted handler (or a context copied from
one) for the lineage and the trace to be carried.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import grpc
import numpy as np
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.trace import TracerProvider
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

import envelope_grpc
from envelope_grpc._constants import ENVELOPE_ID_METADATA

#: Trailing metadata naming the downstream call's envelope.
#: Metadata a tool call sends for the caller it acts for, e.g. (("authorization", "Bearer ..."),).
Credentials = tuple[tuple[str, str | bytes], ...]
GENERATOR: Final = "tiny-lm"
EMBEDDER: Final = "text-embedder"


@dataclasses.dataclass(frozen=True, slots=True)
class ToolResult:
    """What one tool call returned."""

    model: str
    envelope_id: str
    tokens: int
    text: str = ""
    embedding: tuple[float, ...] = ()


class ToolError(Exception):
    """A downstream call that failed, with its status and envelope id."""

    def __init__(self, model: str, code: grpc.StatusCode, details: str, envelope_id: str) -> None:
        super().__init__(f"{model}: {code.name}: {details}")
        self.model = model
        self.code = code
        self.details = details
        self.envelope_id = envelope_id


def _envelope_id(call: Any) -> str:
    trailers = call.trailing_metadata() if call is not None else None
    for key, value in trailers or ():
        if key == ENVELOPE_ID_METADATA:
            return value.decode("ascii") if isinstance(value, bytes) else str(value)
    return ""


class InferenceTools:
    """Calls tiny-lm and text-embedder on the inference service at ``address``."""

    def __init__(
        self, address: str, *, tracer_provider: TracerProvider | None = None, timeout: float = 10.0
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        tracer = client_interceptor(tracer_provider=tracer_provider)  # type: ignore[no-untyped-call]
        traced = intercept_channel(self._channel, tracer)  # type: ignore[no-untyped-call]
        carried = grpc.intercept_channel(traced, envelope_grpc.EnvelopeClientInterceptor())
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(carried)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def generate(
        self, prompt: str, max_tokens: int, *, tenant: str = "", credentials: Credentials = ()
    ) -> ToolResult:
        """Generate at most ``max_tokens`` tokens after ``prompt`` with tiny-lm,
        sending ``credentials`` (metadata pairs) with the call."""
        result, model, envelope_id = self._infer(GENERATOR, "prompt", prompt, max_tokens, tenant, credentials)
        text = result.as_numpy("text")
        tokens = result.as_numpy("num_tokens")
        return ToolResult(
            model=model,
            envelope_id=envelope_id,
            tokens=int(tokens.sum()),
            text=bytes(text[0]).decode("utf-8", "replace") if len(text) else "",
        )

    def embed(
        self, text: str, max_tokens: int, *, tenant: str = "", credentials: Credentials = ()
    ) -> ToolResult:
        """Embed at most ``max_tokens`` tokens of ``text`` with text-embedder,
        sending ``credentials`` (metadata pairs) with the call."""
        result, model, envelope_id = self._infer(EMBEDDER, "text", text, max_tokens, tenant, credentials)
        embedding = result.as_numpy("embedding")
        return ToolResult(
            model=model,
            envelope_id=envelope_id,
            tokens=int(result.as_numpy("num_tokens").sum()),
            embedding=tuple(float(value) for value in embedding[0]),
        )

    def _infer(
        self, model: str, input_name: str, text: str, max_tokens: int, tenant: str, credentials: Credentials
    ) -> tuple[Any, str, str]:
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="BYTES", shape=[1])
        element = np.array([text.encode("utf-8")], dtype=np.object_)
        request.raw_input_contents.append(serialize_byte_tensor(element).item())
        request.parameters["max_tokens"].int64_param = max_tokens
        if tenant:
            request.parameters["tenant"].string_param = tenant
        try:
            response, call = self._stub.ModelInfer.with_call(
                request, timeout=self.timeout, metadata=credentials or None
            )
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):
                raise ToolError(model, grpc.StatusCode.UNKNOWN, str(error), "") from error
            raise ToolError(model, error.code(), error.details() or "", _envelope_id(error)) from error
        return InferResult(response), f"{response.model_name}/{response.model_version}", _envelope_id(call)
