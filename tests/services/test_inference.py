"""The inference service, driven by tritonclient's own gRPC clients (sync and
aio) against a real server started by services._runtime.start.

Expected outputs are computed here with numpy from the models' published
weights, not by calling the models' own code paths.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import envelope_grpc
from envelope_grpc import Action, EnvelopeConfig, ExtractorRegistry, Limit, LimitsPolicy
from envelope_grpc.v1.envelope_pb2 import (
    DecisionOutcome,
    ExecutionEnvelope,
    ExecutionKind,
    GrantStage,
    LifecycleState,
    ResourceDimension,
)
from services import _runtime, inference
from services.inference import extract, models, tensors
from tests.conftest import first_grant
from tests.services import conftest

INFER = extract.MODEL_INFER
KIND = ExecutionKind
STATE = LifecycleState
OUTCOME = DecisionOutcome

IRIS = np.array(
    [
        [5.1, 3.5, 1.4, 0.2],
        [4.9, 3.0, 1.4, 0.2],
        [5.9, 2.8, 4.3, 1.3],
        [6.0, 2.2, 5.0, 1.5],
        [6.7, 3.0, 5.2, 2.3],
    ],
    dtype=np.float32,
)


class Served(conftest.Served):
    """A running inference service and the envelopes it reported."""

    def __init__(self, config: EnvelopeConfig | None = None) -> None:
        default = EnvelopeConfig(trust_peer=_runtime.trusted_loopback)
        super().__init__(inference.services(), config if config is not None else default)

    def envelopes(self, count: int, *, exact: bool = False) -> list[ExecutionEnvelope]:
        """Exactly the first ``count`` envelopes, all valid."""
        return super().envelopes(count, exact=exact)

    def check(self, env: ExecutionEnvelope) -> None:
        assert envelope_grpc.validate(env) == [], envelope_grpc.to_json(env)

    def by_id(self, envelope_id: str, count: int) -> ExecutionEnvelope:
        return next(env for env in self.envelopes(count) if env.envelope_id == envelope_id)


@pytest.fixture
def serve(servers: conftest.Servers) -> Callable[..., Served]:
    return functools.partial(servers, Served)


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


@pytest.fixture
def client(served: Served) -> Iterator[tgrpc.InferenceServerClient]:
    triton = tgrpc.InferenceServerClient(served.address)
    yield triton
    triton.close()


# -- expected values, computed here -------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    result: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return result


def expected_iris(version: str, x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    if version == "1":
        logits = x64 @ models.IRIS_LR_WEIGHTS.T + models.IRIS_LR_BIAS
    else:
        hidden = np.maximum(x64 @ models.IRIS_MLP_W1.T + models.IRIS_MLP_B1, 0.0)
        logits = hidden @ models.IRIS_MLP_W2.T + models.IRIS_MLP_B2
    return softmax(logits).astype(np.float32)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def expected_embedding(text: str, limit: int) -> tuple[np.ndarray, int]:
    counts = np.zeros(models.HASH_BUCKETS)
    tokens = words(text)[:limit]
    for token in tokens:
        h = zlib.crc32(token.encode())
        counts[h % models.HASH_BUCKETS] += -1.0 if (h >> 16) & 1 else 1.0
    vector = counts @ models.EMBED_PROJECTION
    norm = np.linalg.norm(vector)
    return (vector / norm if norm else vector).astype(np.float32), len(tokens)


def expected_generation(prompt: str, limit: int) -> list[int]:
    vocab = models.LM_VOCAB
    ids = [
        vocab.index(w) if w in vocab[1:] else 1 + zlib.crc32(w.encode()) % (len(vocab) - 1)
        for w in words(prompt)
    ]
    bag = np.bincount(np.array(ids, dtype=np.int64), minlength=len(vocab)).astype(np.float64) / max(
        len(ids), 1
    )
    previous, seen, out = (ids[-1] if ids else 0), np.zeros(len(vocab)), []
    for step in range(limit):
        scores = (
            models.LM_TRANSITION[previous] + models.LM_PROMPT_WEIGHT * bag - models.LM_REPEAT_PENALTY * seen
        )
        scores[0] = models.LM_EOS_BASE + models.LM_EOS_RAMP * step
        token = int(np.argmax(scores))
        if token == 0:
            break
        out.append(token)
        seen[token] += 1
        previous = token
    return out


def bytes_input(name: str, values: list[bytes]) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_))
    return tensor


def features_input(x: np.ndarray) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


# -- probes and metadata ---------------------------------------------------------------


def test_probes_and_metadata(served: Served, client: tgrpc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris-classifier")
    assert client.is_model_ready("iris-classifier", "1")
    assert not client.is_model_ready("iris-classifier", "9")
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata("iris-classifier")
    assert metadata.name == "iris-classifier"
    assert list(metadata.versions) == ["1", "2"]
    assert metadata.platform == "numpy"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("features", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, 3]),
        ("label", "INT64", [-1]),
    ]
    assert list(client.get_model_metadata("iris-classifier", "1").versions) == ["1"]
    lm = client.get_model_metadata("tiny-lm")
    assert [(t.name, t.datatype, list(t.shape)) for t in lm.outputs] == [
        ("text", "BYTES", [-1]),
        ("token_ids", "INT64", [-1, -1]),
        ("num_tokens", "INT64", [-1]),
    ]
    assert client.get_server_metadata().name == "envelope-grpc-inference"

    envs = served.envelopes(10)
    methods = [env.execution.method.rsplit("/", 1)[1] for env in envs]
    assert methods == [
        "ServerLive",
        "ServerReady",
        *["ModelReady"] * 4,
        *["ModelMetadata"] * 3,
        "ServerMetadata",
    ]
    assert all(env.execution.kind == KIND.EXECUTION_KIND_CONTROL for env in envs)
    assert all(env.lifecycle.state == STATE.LIFECYCLE_STATE_COMPLETED for env in envs)
    assert (envs[0].execution.target.type, envs[0].execution.target.name) == ("server", "inference")
    ready_unknown = envs[4].execution.target
    assert (ready_unknown.type, ready_unknown.name, ready_unknown.version) == (
        "model",
        "iris-classifier",
        "9",
    )
    assert envs[7].execution.target.name == "iris-classifier"
    assert envs[7].execution.target.version == "1"


def test_probes_can_be_skipped(serve: Callable[..., Served]) -> None:
    server = serve(
        EnvelopeConfig(
            extractors=ExtractorRegistry(rules=extract.SKIPPABLE), trust_peer=_runtime.trusted_loopback
        )
    )
    with tgrpc.InferenceServerClient(server.address) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tiny-lm")
    (env,) = server.envelopes(1)
    assert env.execution.method == extract.MODEL_READY


# -- inference -------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
def test_iris_batch(served: Served, client: tgrpc.InferenceServerClient, version: str) -> None:
    result = client.infer(
        "iris-classifier",
        [features_input(IRIS)],
        model_version=version,
        outputs=[tgrpc.InferRequestedOutput("probabilities"), tgrpc.InferRequestedOutput("label")],
    )
    expected = expected_iris(version, IRIS)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(axis=1))
    np.testing.assert_array_equal(result.as_numpy("label")[:3], [0, 0, 1])
    assert result.get_response().model_version == version

    (env,) = served.envelopes(1)
    assert env.execution.method == INFER
    assert env.execution.kind == KIND.EXECUTION_KIND_INFERENCE
    target = env.execution.target
    assert (target.type, target.name, target.version) == ("model", "iris-classifier", version)
    assert target.attributes["batch_size"] == "5"
    assert env.requested.bytes == 5 * 4 * 4
    assert not env.requested.HasField("tokens")
    assert not env.requested.HasField("concurrency")
    assert env.binding.runtime == "numpy"
    assert env.binding.endpoint == f"v2/models/iris-classifier/versions/{version}"
    assert env.binding.attributes["model_version"] == version
    assert [g.stage for g in env.grants] == [GrantStage.GRANT_STAGE_ADMISSION]
    assert env.lifecycle.state == STATE.LIFECYCLE_STATE_COMPLETED
    assert [t.to for t in env.lifecycle.transitions][-2:] == [
        STATE.LIFECYCLE_STATE_BOUND,
        STATE.LIFECYCLE_STATE_COMPLETED,
    ]


def test_iris_default_version_is_the_latest(served: Served, client: tgrpc.InferenceServerClient) -> None:
    result = client.infer("iris-classifier", [features_input(IRIS[:2])])
    assert result.get_response().model_version == "2"
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected_iris("2", IRIS[:2]), rtol=1e-6)
    (env,) = served.envelopes(1)
    assert env.execution.target.version == ""
    assert env.execution.target.attributes["batch_size"] == "2"
    assert env.binding.attributes["model_version"] == "2"


def test_text_embedder(served: Served, client: tgrpc.InferenceServerClient) -> None:
    texts = [b"Envelopes record grants", b"", b"the agent plans a search over the graph"]
    result = client.infer("text-embedder", [bytes_input("text", texts)])
    embeddings = result.as_numpy("embedding")
    assert embeddings.shape == (3, models.EMBEDDING_DIM)
    for row, text in enumerate(texts):
        vector, count = expected_embedding(text.decode(), 128)
        np.testing.assert_allclose(embeddings[row], vector, rtol=1e-6, atol=1e-7)
        assert result.as_numpy("num_tokens")[row] == count
    np.testing.assert_allclose(np.linalg.norm(embeddings[[0, 2]], axis=1), [1.0, 1.0], rtol=1e-6)
    assert not embeddings[1].any()

    truncated = client.infer("text-embedder", [bytes_input("text", texts)], parameters={"max_tokens": 2})
    np.testing.assert_array_equal(truncated.as_numpy("num_tokens"), [2, 0, 2])
    np.testing.assert_allclose(
        truncated.as_numpy("embedding")[2], expected_embedding(texts[2].decode(), 2)[0], rtol=1e-6, atol=1e-7
    )

    first, second = served.envelopes(2)
    assert first.execution.target.name == "text-embedder"
    assert first.requested.bytes == sum(len(t) + 4 for t in texts)
    assert not first.requested.HasField("tokens")
    assert first.outcome.usage.tokens == 3 + 0 + 8
    assert [g.stage for g in first.grants] == [GrantStage.GRANT_STAGE_ADMISSION]  # no tokens asked: no grant
    assert second.requested.tokens == 2 * 3
    backend = first_grant(second, GrantStage.GRANT_STAGE_BACKEND)
    assert (backend.outcome, backend.resources.tokens) == (OUTCOME.DECISION_OUTCOME_ADMITTED, 6)
    assert second.outcome.usage.tokens == 4


def test_tiny_lm_tokens(served: Served, client: tgrpc.InferenceServerClient) -> None:
    prompt = "plan the agent budget"
    capped = client.infer(
        "tiny-lm", [bytes_input("prompt", [prompt.encode()])], parameters={"max_tokens": 3, "tenant": "acme"}
    )
    want = expected_generation(prompt, 3)
    assert len(want) == 3
    np.testing.assert_array_equal(capped.as_numpy("token_ids"), [want])
    np.testing.assert_array_equal(capped.as_numpy("num_tokens"), [3])
    assert capped.as_numpy("text")[0].decode() == " ".join(models.LM_VOCAB[t] for t in want)

    natural = expected_generation(prompt, 64)
    assert 3 < len(natural) < 20  # stopped by <eos>, not by the limit
    free = client.infer(
        "tiny-lm", [bytes_input("prompt", [prompt.encode()])], parameters={"max_tokens": 1000}
    )
    np.testing.assert_array_equal(free.as_numpy("token_ids"), [natural])

    first, second = served.envelopes(2)
    assert first.principal.tenant == "acme"
    assert first.requested.tokens == 3
    assert first.outcome.usage.tokens == 3
    backend = first_grant(first, GrantStage.GRANT_STAGE_BACKEND)
    assert (backend.outcome, backend.resources.tokens) == (OUTCOME.DECISION_OUTCOME_ADMITTED, 3)
    assert backend.resources.bytes == first.requested.bytes == 4 + len(prompt)

    assert second.requested.tokens == 1000
    narrowed = first_grant(second, GrantStage.GRANT_STAGE_BACKEND)
    assert narrowed.outcome == OUTCOME.DECISION_OUTCOME_NARROWED
    assert narrowed.resources.tokens == models.TinyLm.token_limit
    assert narrowed.reason_code == "MODEL_MAX_TOKENS"
    assert "64" in narrowed.reason
    assert second.outcome.usage.tokens == len(natural)
    assert [t.to for t in second.lifecycle.transitions][-3:] == [
        STATE.LIFECYCLE_STATE_GRANTED,
        STATE.LIFECYCLE_STATE_BOUND,
        STATE.LIFECYCLE_STATE_COMPLETED,
    ]


def test_tiny_lm_batch_and_admission_narrowing(serve: Callable[..., Served]) -> None:
    limits = LimitsPolicy(
        [Limit(ResourceDimension.RESOURCE_DIMENSION_TOKENS, 8, ExecutionKind.EXECUTION_KIND_INFERENCE)]
    )
    server = serve(EnvelopeConfig(policies=[limits]))
    prompts = ["hello world", "what is the answer"]
    with tgrpc.InferenceServerClient(server.address) as client:
        result = client.infer(
            "tiny-lm",
            [bytes_input("prompt", [p.encode() for p in prompts])],
            parameters={"max_tokens": 10},
        )
    expected = [expected_generation(p, 4) for p in prompts]  # 8 admitted tokens / 2 prompts
    np.testing.assert_array_equal(result.as_numpy("num_tokens"), [len(e) for e in expected])
    np.testing.assert_array_equal(result.as_numpy("token_ids"), expected)
    (env,) = server.envelopes(1)
    assert env.execution.target.attributes["batch_size"] == "2"
    assert env.requested.tokens == 20
    assert env.decision.outcome == OUTCOME.DECISION_OUTCOME_NARROWED
    backend = first_grant(env, GrantStage.GRANT_STAGE_BACKEND)
    assert (backend.outcome, backend.resources.tokens) == (OUTCOME.DECISION_OUTCOME_NARROWED, 8)
    assert backend.reason_code == env.decision.reason_code != ""
    assert env.outcome.usage.tokens == sum(len(e) for e in expected)


# -- errors ----------------------------------------------------------------------------


def test_errors(served: Served, client: tgrpc.InferenceServerClient) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        (dict(model_name="no-such-model", inputs=[features_input(IRIS)]), "NOT_FOUND", "unknown model"),
        (
            dict(model_name="iris-classifier", model_version="7", inputs=[features_input(IRIS)]),
            "NOT_FOUND",
            "no version '7'",
        ),
        (
            dict(model_name="iris-classifier", inputs=[features_input(IRIS[:, :3].copy())]),
            "INVALID_ARGUMENT",
            "must have shape [-1, 4], got [5, 3]",
        ),
        (
            dict(model_name="iris-classifier", inputs=[bytes_input("features", [b"x"])]),
            "INVALID_ARGUMENT",
            "must be FP32, got BYTES",
        ),
        (
            dict(model_name="tiny-lm", inputs=[bytes_input("text", [b"x"])]),
            "INVALID_ARGUMENT",
            "has no input 'text'",
        ),
        (
            dict(
                model_name="tiny-lm",
                inputs=[bytes_input("prompt", [b"x"])],
                outputs=[tgrpc.InferRequestedOutput("logits")],
            ),
            "INVALID_ARGUMENT",
            "no output 'logits'",
        ),
        (
            dict(model_name="tiny-lm", inputs=[bytes_input("prompt", [b"x"])], parameters={"max_tokens": -1}),
            "INVALID_ARGUMENT",
            "'max_tokens' is negative",
        ),
        (
            dict(
                model_name="tiny-lm", inputs=[bytes_input("prompt", [b"x"])], parameters={"max_tokens": "ten"}
            ),
            "INVALID_ARGUMENT",
            "'max_tokens' must be an integer",
        ),
    ]
    for kwargs, code, text in cases:
        with pytest.raises(InferenceServerException) as raised:
            client.infer(**kwargs)
        assert raised.value.status() == f"StatusCode.{code}"
        assert text in (raised.value.message() or "")

    envs = served.envelopes(len(cases))
    for env, (kwargs, code, text) in zip(envs, cases, strict=True):
        assert env.execution.kind == KIND.EXECUTION_KIND_INFERENCE
        assert env.execution.target.name == kwargs["model_name"]
        assert env.lifecycle.state == STATE.LIFECYCLE_STATE_FAILED
        assert env.outcome.status_code == grpc.StatusCode[code].value[0]
        assert text in env.outcome.status_message
        assert not env.HasField("binding")
    assert envs[1].execution.target.version == "7"
    assert not envs[6].requested.HasField("tokens")  # a negative ask is not an ask


def stub_call(address: str, request: Any) -> tuple[Any, str]:
    """ModelInfer on the raw stub; the response and the call's envelope id."""
    with grpc.insecure_channel(address) as channel:
        response, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request)
    trailers = dict(call.trailing_metadata() or ())
    return response, str(trailers["x-execution-envelope-id"])


def test_typed_contents(served: Served) -> None:
    request = service_pb2.ModelInferRequest(model_name="iris-classifier", model_version="1", id="req-7")
    features = request.inputs.add(name="features", datatype="FP32", shape=[2, 4])
    features.contents.fp32_contents.extend(IRIS[:2].reshape(-1).tolist())
    request.parameters["tenant"].string_param = "globex"
    response, envelope_id = stub_call(served.address, request)
    result = tgrpc.InferResult(response)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected_iris("1", IRIS[:2]), rtol=1e-6)
    assert response.id == "req-7"

    lm = service_pb2.ModelInferRequest(model_name="tiny-lm")
    prompt = lm.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    prompt.contents.bytes_contents.append(b"search the graph")
    lm.parameters["max_tokens"].uint64_param = 2
    lm_response, lm_id = stub_call(served.address, lm)
    assert tgrpc.InferResult(lm_response).as_numpy("token_ids").tolist() == [
        expected_generation("search the graph", 2)
    ]

    env = served.by_id(envelope_id, 2)
    assert env.requested.bytes == 2 * 4 * 4  # counted as the raw encoding would be
    assert env.principal.tenant == "globex"
    lm_env = served.by_id(lm_id, 2)
    assert lm_env.requested.bytes == 4 + len(b"search the graph")
    assert lm_env.requested.tokens == 2
    assert lm_env.outcome.usage.tokens == 2


def test_raw_contents_errors(served: Served) -> None:
    request = service_pb2.ModelInferRequest(model_name="iris-classifier")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 12)
    with pytest.raises(grpc.RpcError) as raised:
        stub_call(served.address, request)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 16 bytes, got 12" in (raised.value.details() or "")
    (env,) = served.envelopes(1)
    assert env.lifecycle.state == STATE.LIFECYCLE_STATE_FAILED
    assert env.requested.bytes == 12


# -- the aio client --------------------------------------------------------------------


async def test_aio_client(served: Served) -> None:
    client = tgrpc_aio.InferenceServerClient(served.address)
    try:
        assert await client.is_server_live()
        metadata = await client.get_model_metadata("text-embedder")
        assert [(t.name, list(t.shape)) for t in metadata.outputs] == [
            ("embedding", [-1, models.EMBEDDING_DIM]),
            ("num_tokens", [-1]),
        ]
        iris = tgrpc_aio.InferInput("features", [3, 4], "FP32")
        iris.set_data_from_numpy(IRIS[2:])
        result = await client.infer("iris-classifier", [iris], model_version="2")
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected_iris("2", IRIS[2:]), rtol=1e-6)

        prompt = tgrpc_aio.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"tenant policy grant"], dtype=np.object_))
        generated = await client.infer("tiny-lm", [prompt], parameters={"max_tokens": 5})
        want = expected_generation("tenant policy grant", 5)
        np.testing.assert_array_equal(generated.as_numpy("token_ids"), [want])

        with pytest.raises(InferenceServerException) as raised:
            await client.infer("missing", [prompt])
        assert raised.value.status() == "StatusCode.NOT_FOUND"
    finally:
        await client.close()

    live, meta, batch, lm, missing = served.envelopes(5)
    assert live.execution.kind == meta.execution.kind == KIND.EXECUTION_KIND_CONTROL
    assert meta.execution.target.name == "text-embedder"
    assert batch.execution.target.attributes["batch_size"] == "3"
    assert batch.requested.bytes == 3 * 4 * 4
    assert (batch.execution.target.name, batch.execution.target.version) == ("iris-classifier", "2")
    assert lm.requested.tokens == 5
    assert lm.outcome.usage.tokens == len(want)
    assert missing.lifecycle.state == STATE.LIFECYCLE_STATE_FAILED
    assert missing.outcome.status_code == grpc.StatusCode.NOT_FOUND.value[0]


# -- the codec and the extractor, directly --------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", [1.5, -2.25, 3.0]),
        ("FP64", "fp64_contents", [1.5, -2.25, 3.0]),
        ("INT32", "int_contents", [1, -2, 2**31 - 1]),
        ("INT64", "int64_contents", [1, -2, 2**62]),
        ("UINT8", "uint_contents", [0, 7, 255]),
        ("BOOL", "bool_contents", [True, False, True]),
    ],
)
def test_decode_raw_and_typed_contents_agree(datatype: str, field: str, values: list[Any]) -> None:
    dtype = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1", "BOOL": "?"}[
        datatype
    ]
    typed = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[1, 3])
    getattr(typed.contents, field).extend(values)
    raw = np.array(values, dtype=dtype).tobytes()
    from_contents = tensors.decode_input(typed, None)
    from_raw = tensors.decode_input(typed, raw)
    assert from_contents.shape == from_raw.shape == (1, 3)
    np.testing.assert_array_equal(from_contents, from_raw)
    np.testing.assert_array_equal(from_raw.reshape(-1), np.array(values, dtype=dtype))
    assert tensors.contents_bytes(typed) == len(raw)


def test_decode_bytes_and_errors() -> None:
    values = [b"ab", b"", b"\x00\xff"]
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="s", datatype="BYTES", shape=[3])
    assert tensors.decode_input(tensor, raw).tolist() == values
    assert tensors.encode_bytes(np.array(values, dtype=np.object_)) == raw
    tensor.contents.bytes_contents.extend(values)
    assert tensors.contents_bytes(tensor) == len(raw)
    with pytest.raises(tensors.TensorError, match="runs past the end"):
        tensors.decode_input(tensor, raw[:-1])
    with pytest.raises(tensors.TensorError, match="needs 3 BYTES elements, the data holds 2"):
        tensors.decode_input(tensor, raw[: -(4 + 2)])
    fp16 = service_pb2.ModelInferRequest.InferInputTensor(name="h", datatype="FP16", shape=[1])
    with pytest.raises(tensors.TensorError, match="must be sent in raw_input_contents"):
        tensors.decode_input(fp16, None)
    odd = service_pb2.ModelInferRequest.InferInputTensor(name="c", datatype="COMPLEX64", shape=[1])
    with pytest.raises(tensors.TensorError, match="unsupported datatype"):
        tensors.decode_input(odd, b"")
    negative = service_pb2.ModelInferRequest.InferInputTensor(name="n", datatype="FP32", shape=[-1, 4])
    with pytest.raises(tensors.TensorError, match="negative dimension"):
        tensors.decode_input(negative, b"")


def test_extractor_mapping() -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny-lm", model_version="1")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[4])
    request.raw_input_contents.append(b"\0" * 16)
    request.parameters["max_tokens"].int64_param = 12
    request.parameters["tenant"].string_param = "initech"
    found = extract.extract_model_infer(request)
    assert found.kind == KIND.EXECUTION_KIND_INFERENCE
    assert (found.target.type, found.target.name, found.target.version) == ("model", "tiny-lm", "1")
    assert dict(found.target.attributes) == {"batch_size": "4"}
    assert (found.requested.bytes, found.requested.tokens) == (16, 48)
    assert not found.requested.HasField("concurrency")
    assert found.tenant == "initech"

    request.parameters["max_tokens"].string_param = "12"
    assert not extract.extract_model_infer(request).requested.HasField("tokens")
    empty = extract.extract_model_infer(service_pb2.ModelInferRequest(model_name="m"))
    assert "batch_size" not in empty.target.attributes
    assert empty.requested.bytes == 0
    assert empty.requested.HasField("bytes")

    live = extract.extract_server_control(service_pb2.ServerLiveRequest())
    assert (live.kind, live.target.type) == (KIND.EXECUTION_KIND_CONTROL, "server")
    ready = extract.extract_model_control(service_pb2.ModelReadyRequest(name="iris-classifier", version="2"))
    assert (ready.kind, ready.target.name, ready.target.version) == (
        KIND.EXECUTION_KIND_CONTROL,
        "iris-classifier",
        "2",
    )
    assert {method for method, _ in extract.extractors()} == {
        extract.MODEL_INFER,
        extract.MODEL_METADATA,
        extract.MODEL_READY,
        extract.SERVER_LIVE,
        extract.SERVER_READY,
        extract.SERVER_METADATA,
    }
    assert extract.SKIPPABLE == {extract.SERVER_LIVE: Action.SKIP, extract.SERVER_READY: Action.SKIP}
