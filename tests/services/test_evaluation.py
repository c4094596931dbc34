"""The evaluation service, served for real on 127.0.0.1:0 with the envelope
interceptors: metrics checked against numpy computed here, independently of
the service's own metric code, and every envelope validated."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
import pytest

import services.evaluation
from envelope_grpc import EnvelopeConfig, Limit, LimitsPolicy
from envelope_grpc.v1.envelope_pb2 import (
    DataClassification,
    DecisionOutcome,
    ExecutionEnvelope,
    ExecutionKind,
    GrantStage,
    LifecycleState,
    ResourceDimension,
    Resources,
)
from services.evaluation._catalog import builtin
from services.evaluation.v1 import evaluation_pb2 as pb
from services.evaluation.v1 import evaluation_pb2_grpc as pb_grpc
from tests.conftest import COMPLETED_PATH, error_info, only_grant, transitions
from tests.services import conftest

CATALOG = builtin()
NODE = "eval-node-1"
S = LifecycleState
BACKEND = GrantStage.GRANT_STAGE_BACKEND


class Served(conftest.Served):
    """A running evaluation service and a stub to call it."""

    def __init__(self, config: EnvelopeConfig | None = None, **options: Any) -> None:
        super().__init__(services.evaluation.services(node=NODE, **options), config)
        self.stub = pb_grpc.EvaluationServiceStub(self.channel)

    def evaluate(self, **fields: Any) -> list[pb.EvaluateModelResponse]:
        return list(self.stub.EvaluateModel(pb.EvaluateModelRequest(**fields), timeout=30))

    def envelope(self) -> ExecutionEnvelope:
        (env,) = self.envelopes(1)
        return env


@pytest.fixture
def serve(servers: conftest.Servers) -> Callable[..., Served]:
    return functools.partial(servers, Served)


# -- independent reference computations ------------------------------------------------------


def nearest_centroid(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    distances = np.linalg.norm(features[:, None, :] - centroids[None, :, :], axis=2)
    return np.asarray(np.argmin(distances, axis=1))


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, classes: int) -> dict[str, float]:
    precisions, recalls, f1s = [], [], []
    for c in range(classes):
        tp = int(np.sum((predicted == c) & (truth == c)))
        fp = int(np.sum((predicted == c) & (truth != c)))
        fn = int(np.sum((predicted != c) & (truth == c)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "precision": sum(precisions) / classes,
        "recall": sum(recalls) / classes,
        "f1": sum(f1s) / classes,
    }


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    errors = predicted - truth
    mse = float(np.mean(errors**2))
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(errors))),
        "r2": 1.0 - float(np.sum(errors**2)) / float(np.sum((truth - truth.mean()) ** 2)),
    }


def close_to(expected: Mapping[str, float]) -> Any:
    return pytest.approx(dict(expected), rel=1e-12, abs=1e-12)


# -- tests ------------------------------------------------------------------------------------------


def test_classification_evaluated_for_real_with_progress_per_batch(serve: Callable[..., Served]) -> None:
    served = serve()
    responses = served.evaluate(
        model="iris-centroid",
        dataset="iris-like",
        metrics=["accuracy", "f1", "precision", "recall"],
        sample_limit=100,
        batch_size=16,
        accelerators=pb.Accelerators(count=2, type="nvidia-a100"),
        tenant="acme",
        project="vision",
        data_classification=DataClassification.DATA_CLASSIFICATION_PUBLIC,
        timeout_ms=60_000,
        purpose="release-gate",
    )

    dataset = CATALOG.datasets["iris-like"]
    centroids = CATALOG.models["iris-centroid"]["2"].centroids  # type: ignore[attr-defined]
    truth = dataset.labels[:100]
    predicted = nearest_centroid(dataset.features[:100], centroids)
    expected = classification_metrics(truth, predicted, 3)
    assert 0.9 < expected["accuracy"] < 1.0  # a real, imperfect model

    *progress, last = responses
    assert [r.WhichOneof("event") for r in responses] == ["progress"] * 7 + ["result"]
    assert [p.progress.batch for p in progress] == [1, 2, 3, 4, 5, 6, 7]
    assert [p.progress.samples_done for p in progress] == [16, 32, 48, 64, 80, 96, 100]
    assert {p.progress.samples_total for p in progress} == {100}
    for message in progress:
        done = message.progress.samples_done
        running = classification_metrics(truth[:done], predicted[:done], 3)
        assert dict(message.progress.metrics) == close_to(running)
    result = last.result
    assert (result.model, result.model_version, result.dataset) == ("iris-centroid", "2", "iris-like")
    assert result.samples_evaluated == 100
    assert dict(result.metrics) == close_to(expected)
    assert result.metrics["accuracy"] == np.count_nonzero(predicted == truth) / 100

    env = served.envelope()
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_EVALUATION
    assert env.execution.method == "/services.evaluation.v1.EvaluationService/EvaluateModel"
    target = env.execution.target
    assert (target.type, target.name, target.version) == ("model", "iris-centroid", "")
    assert dict(target.attributes) == {"sample_limit": "100"}
    assert list(env.scope.datasets) == ["iris-like"]
    assert env.scope.data_classification == DataClassification.DATA_CLASSIFICATION_PUBLIC
    assert env.scope.purpose == "release-gate"
    assert (env.principal.tenant, env.principal.project) == ("acme", "vision")
    assert env.requested == Resources(
        accelerator_count=2, accelerator_type="nvidia-a100", concurrency=16, duration_ms=60_000
    )
    grant = only_grant(env, BACKEND)
    assert grant.resources == Resources(accelerator_count=0, concurrency=16, duration_ms=60_000)
    assert grant.outcome == DecisionOutcome.DECISION_OUTCOME_NARROWED
    assert grant.reason_code == "NO_ACCELERATORS"
    assert grant.reason
    assert env.binding.node == NODE
    assert env.binding.runtime == f"numpy-{np.__version__}"
    assert dict(env.binding.attributes) == {
        "model": "iris-centroid",
        "model_version": "2",
        "dataset": "iris-like",
        "device": "cpu",
    }
    assert transitions(env) == COMPLETED_PATH
    assert env.outcome.status_code == 0
    assert env.outcome.usage.request_messages == 1
    assert env.outcome.usage.response_messages == 8
    assert env.outcome.usage.items == 100  # samples evaluated


def test_regression_with_default_batch_widens_concurrency(serve: Callable[..., Served]) -> None:
    served = serve()
    responses = served.evaluate(
        model="housing-linear",
        model_version="1",
        dataset="housing-regression",
        data_classification=DataClassification.DATA_CLASSIFICATION_INTERNAL,
    )

    dataset = CATALOG.datasets["housing-regression"]
    model = CATALOG.models["housing-linear"]["1"]
    predicted = dataset.features @ model.weights + model.bias  # type: ignore[attr-defined]
    expected = regression_metrics(dataset.labels, predicted)
    assert 0.5 < expected["r2"] < 1.0

    assert len(responses) == math.ceil(200 / 32) + 1
    assert [r.progress.samples_done for r in responses[:-1]] == [32, 64, 96, 128, 160, 192, 200]
    assert dict(responses[-1].result.metrics) == close_to(expected)
    assert set(responses[-1].result.metrics) == {"mse", "rmse", "mae", "r2"}  # all, when none is named

    env = served.envelope()
    assert env.execution.target.version == "1"
    assert env.requested == Resources()
    grant = only_grant(env, BACKEND)
    assert grant.resources == Resources(concurrency=32)
    assert grant.outcome == DecisionOutcome.DECISION_OUTCOME_WIDENED
    assert grant.reason_code == "DEFAULT_BATCH"
    assert transitions(env) == COMPLETED_PATH


def test_batch_above_the_backend_limit_is_narrowed(serve: Callable[..., Served]) -> None:
    served = serve(max_batch=10)
    responses = served.evaluate(
        model="iris-linear", dataset="iris-like", metrics=["accuracy"], sample_limit=30, batch_size=50
    )
    assert [r.progress.samples_done for r in responses[:-1]] == [10, 20, 30]
    env = served.envelope()
    grant = only_grant(env, BACKEND)
    assert env.requested.concurrency == 50
    assert grant.resources.concurrency == 10
    assert (grant.outcome, grant.reason_code) == (DecisionOutcome.DECISION_OUTCOME_NARROWED, "BATCH_LIMITED")


def test_backend_grant_builds_on_admission_narrowing(serve: Callable[..., Served]) -> None:
    limits = LimitsPolicy([Limit(ResourceDimension.RESOURCE_DIMENSION_CONCURRENCY, 8)])
    served = serve(EnvelopeConfig(policies=[limits]))
    responses = served.evaluate(
        model="iris-centroid", model_version="1", dataset="iris-like", sample_limit=20, batch_size=64
    )
    assert [r.progress.samples_done for r in responses[:-1]] == [8, 16, 20]
    env = served.envelope()
    admission, backend = env.grants
    assert admission.stage == GrantStage.GRANT_STAGE_ADMISSION
    assert admission.resources.concurrency == 8
    assert backend.resources.concurrency == 8
    assert backend.outcome == DecisionOutcome.DECISION_OUTCOME_NARROWED
    assert backend.reason_code == admission.reason_code != ""


def test_evaluation_past_its_granted_duration_is_stopped(serve: Callable[..., Served]) -> None:
    ticks = itertools.count()
    served = serve(clock=lambda: float(next(ticks)))  # one second per reading
    call = served.stub.EvaluateModel(
        pb.EvaluateModelRequest(model="iris-centroid", dataset="iris-like", batch_size=10, timeout_ms=1_500),
        timeout=30,
    )
    received: list[pb.EvaluateModelResponse] = []
    with pytest.raises(grpc.RpcError) as caught:
        received.extend(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(received) == 1  # the first batch finished within 1.5 s, the second did not
    env = served.envelope()
    assert env.lifecycle.state == S.LIFECYCLE_STATE_CANCELLED
    assert env.outcome.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert only_grant(env, BACKEND).resources.duration_ms == 1_500


PUBLIC = DataClassification.DATA_CLASSIFICATION_PUBLIC
INTERNAL = DataClassification.DATA_CLASSIFICATION_INTERNAL


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"model": "iris-centroid", "dataset": "mnist"}, grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND"),
        ({"model": "gpt-9", "dataset": "iris-like"}, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (
            {"model": "iris-centroid", "model_version": "7", "dataset": "iris-like"},
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            {"model": "iris-centroid", "dataset": "iris-like", "metrics": ["bleu"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_METRIC",
        ),
        (
            {"model": "iris-centroid", "dataset": "iris-like", "metrics": ["accuracy", "mse"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "METRIC_NOT_APPLICABLE",
        ),
        (
            {"model": "iris-centroid", "dataset": "iris-like", "sample_limit": 0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SAMPLE_LIMIT",
        ),
        (
            {"model": "iris-centroid", "dataset": "iris-like", "batch_size": 0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_BATCH_SIZE",
        ),
        (
            {"model": "claims-linear", "dataset": "iris-like"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "MODEL_DATASET_MISMATCH",
        ),
        (
            {"model": "claims-linear", "dataset": "claims-binary", "data_classification": INTERNAL},
            grpc.StatusCode.PERMISSION_DENIED,
            "CLASSIFICATION_EXCEEDED",
        ),
        (
            {"model": "housing-linear", "dataset": "housing-regression"},  # undeclared counts as PUBLIC
            grpc.StatusCode.PERMISSION_DENIED,
            "CLASSIFICATION_EXCEEDED",
        ),
    ],
)
def test_refused_before_any_grant(
    serve: Callable[..., Served], fields: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    served = serve()
    with pytest.raises(grpc.RpcError) as caught:
        served.evaluate(accelerators=pb.Accelerators(count=1), **fields)
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason
    env = served.envelope()
    assert info.metadata["envelope_id"] == env.envelope_id
    assert env.lifecycle.state == S.LIFECYCLE_STATE_REJECTED
    assert env.outcome.reason_code == reason
    assert env.outcome.status_code == code.value[0]
    assert [g.stage for g in env.grants] == [GrantStage.GRANT_STAGE_ADMISSION]
    assert not env.HasField("binding")
    assert env.requested.accelerator_count == 1


def test_confidential_dataset_evaluated_when_declared(serve: Callable[..., Served]) -> None:
    served = serve()
    responses = served.evaluate(
        model="claims-linear",
        dataset="claims-binary",
        metrics=["accuracy"],
        batch_size=100,
        data_classification=DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL,
    )
    dataset = CATALOG.datasets["claims-binary"]
    model = CATALOG.models["claims-linear"]["1"]
    scores = dataset.features @ model.weights + model.bias  # type: ignore[attr-defined]
    expected = float(np.mean(np.argmax(scores, axis=1) == dataset.labels))
    assert len(responses) == 4
    assert responses[-1].result.metrics["accuracy"] == expected
    env = served.envelope()
    assert env.scope.data_classification == DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL
    assert only_grant(env, BACKEND).outcome == DecisionOutcome.DECISION_OUTCOME_ADMITTED
    assert transitions(env) == COMPLETED_PATH


def test_the_servicer_runs_without_the_envelope_interceptor() -> None:
    from concurrent import futures

    plain = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    for service in services.evaluation.services(node=NODE):
        service.register(plain)
    port = plain.add_insecure_port("127.0.0.1:0")
    plain.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EvaluationServiceStub(channel)
            request = pb.EvaluateModelRequest(
                model="iris-centroid",
                dataset="iris-like",
                metrics=["accuracy"],
                sample_limit=40,
                batch_size=16,
            )
            *progress, last = stub.EvaluateModel(request, timeout=30)
            assert [p.progress.samples_done for p in progress] == [16, 32, 40]
            assert last.result.samples_evaluated == 40
            with pytest.raises(grpc.RpcError) as caught:
                list(
                    stub.EvaluateModel(pb.EvaluateModelRequest(model="nope", dataset="iris-like"), timeout=30)
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        plain.stop(None).wait()
