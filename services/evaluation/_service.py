"""The evaluation servicer: evaluates a built-in model on a built-in dataset
for real and streams a progress message per batch, then the result.

Envelope steps, in order:

* Refusals of the request itself happen before any grant, through
  ``envelope_grpc.reject`` (state REJECTED, a reason code in the envelope and
  an ErrorInfo for the caller): unknown dataset or model (NOT_FOUND), unknown
  or inapplicable metric and non-positive numbers (INVALID_ARGUMENT), a model
  that does not fit the dataset (FAILED_PRECONDITION), a dataset classified
  above what the request declares (PERMISSION_DENIED).
* The backend's grant starts from admission's grant (or the request). The
  backend runs on CPU only: any accelerator ask is narrowed to none
  (NO_ACCELERATORS); a batch above ``max_batch`` is narrowed to it
  (BATCH_LIMITED); no batch size asked is filled in with the default
  (DEFAULT_BATCH). The granted concurrency is the batch size used and the
  granted duration the time limit enforced.
* The binding names the node, the runtime (numpy and its version) and what
  runs (model, version, dataset).
* Usage: the samples evaluated (``items``); the library adds messages, bytes
  and duration at completion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import grpc
import numpy as np

import envelope_grpc
from envelope_grpc.v1.envelope_pb2 import Binding, DataClassification, Resources, Usage
from services._handler import admission_grant, record_backend_grant, refuse
from services.evaluation import _metrics
from services.evaluation._catalog import Catalog, Dataset, Model
from services.evaluation.v1 import evaluation_pb2 as pb
from services.evaluation.v1 import evaluation_pb2_grpc as pb_grpc

DEFAULT_BATCH: Final = 32
MAX_BATCH: Final = 256
_PUBLIC: Final = DataClassification.DATA_CLASSIFICATION_PUBLIC
_INVALID: Final = grpc.StatusCode.INVALID_ARGUMENT


def backend_grant(
    requested: Resources, admitted: Resources | None, *, max_batch: int, default_batch: int
) -> tuple[Resources, list[tuple[str, str]]]:
    """What this CPU-only backend grants, from admission's grant (or the
    request), and the reasons (code, words) for every change it makes."""
    granted = Resources()
    granted.CopyFrom(admitted if admitted is not None else requested)
    reasons: list[tuple[str, str]] = []
    if granted.accelerator_count > 0 or granted.accelerator_type:
        if granted.HasField("accelerator_count"):
            granted.accelerator_count = 0
        granted.accelerator_type = ""
        reasons.append(("NO_ACCELERATORS", "this backend evaluates on CPU only (numpy)"))
    if not granted.HasField("concurrency"):
        granted.concurrency = default_batch
        reasons.append(("DEFAULT_BATCH", f"batches of {default_batch} samples when none is asked"))
    elif granted.concurrency > max_batch:
        granted.concurrency = max_batch
        reasons.append(("BATCH_LIMITED", f"batches of at most {max_batch} samples"))
    return granted, reasons


class EvaluationServicer(pb_grpc.EvaluationServiceServicer):
    """Evaluates the catalog's models on its datasets."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        node: str,
        max_batch: int = MAX_BATCH,
        default_batch: int = DEFAULT_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.node = node
        self.max_batch = max_batch
        self.default_batch = min(default_batch, max_batch)
        self.clock = clock

    def EvaluateModel(
        self, request: pb.EvaluateModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EvaluateModelResponse]:
        dataset, version, model, metrics = self._resolve(request, context)
        total = len(dataset)
        if request.HasField("sample_limit"):
            if request.sample_limit <= 0:
                refuse(context, "INVALID_SAMPLE_LIMIT", "sample_limit must be positive", _INVALID)
            total = min(total, request.sample_limit)
        for field in ("batch_size", "timeout_ms"):
            if request.HasField(field) and getattr(request, field) <= 0:
                refuse(context, f"INVALID_{field.upper()}", f"{field} must be positive", _INVALID)
        declared = max(request.data_classification, _PUBLIC)
        if dataset.classification > declared:
            refuse(
                context,
                "CLASSIFICATION_EXCEEDED",
                f"dataset {dataset.name!r} is {DataClassification.Name(dataset.classification)}, "
                f"above the declared {DataClassification.Name(declared)}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        batch, timeout_ms = self._grant_and_bind(request, dataset, version)
        yield from self._evaluate(
            context, request, dataset, version, model, metrics, total, batch, timeout_ms
        )

    def _resolve(
        self, request: pb.EvaluateModelRequest, context: grpc.ServicerContext
    ) -> tuple[Dataset, str, Model, list[str]]:
        dataset = self.catalog.datasets.get(request.dataset)
        if dataset is None:
            refuse(context, "DATASET_NOT_FOUND", f"no dataset {request.dataset!r}", grpc.StatusCode.NOT_FOUND)
        found = self.catalog.model(request.model, request.model_version)
        if found is None:
            name = f"{request.model}@{request.model_version}" if request.model_version else request.model
            refuse(context, "MODEL_NOT_FOUND", f"no model {name!r}", grpc.StatusCode.NOT_FOUND)
        version, model = found
        if (
            model.task is not dataset.task
            or model.features != dataset.features.shape[1]
            or (model.classes != dataset.classes)
        ):
            refuse(
                context,
                "MODEL_DATASET_MISMATCH",
                f"model {request.model!r} does not fit dataset {dataset.name!r}",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        table = _metrics.METRICS[dataset.task]
        metrics = list(dict.fromkeys(request.metrics)) or list(table)
        for name in metrics:
            if name not in table:
                reason = "METRIC_NOT_APPLICABLE" if name in _metrics.ALL else "UNKNOWN_METRIC"
                refuse(
                    context,
                    reason,
                    f"metric {name!r} is not one of {', '.join(table)} ({dataset.task.value})",
                    _INVALID,
                )
        return dataset, version, model, metrics

    def _grant_and_bind(
        self, request: pb.EvaluateModelRequest, dataset: Dataset, version: str
    ) -> tuple[int, int | None]:
        """Record the backend's grant and binding; the batch size and time
        limit they set."""
        env = envelope_grpc.current_envelope()
        if env is None:  # served without the envelope interceptor: the request's own ask
            batch = request.batch_size if request.HasField("batch_size") else self.default_batch
            timeout = request.timeout_ms if request.HasField("timeout_ms") else None
            return min(batch, self.max_batch), timeout
        admission = admission_grant(env)
        granted, reasons = backend_grant(
            env.requested,
            admission.resources if admission is not None else None,
            max_batch=self.max_batch,
            default_batch=self.default_batch,
        )
        record_backend_grant(env, granted, reasons)
        envelope_grpc.record_binding(
            Binding(
                node=self.node,
                runtime=f"numpy-{np.__version__}",
                attributes={
                    "model": request.model,
                    "model_version": version,
                    "dataset": dataset.name,
                    "device": "cpu",
                },
            )
        )
        return int(granted.concurrency), int(granted.duration_ms) if granted.HasField("duration_ms") else None

    def _evaluate(
        self,
        context: grpc.ServicerContext,
        request: pb.EvaluateModelRequest,
        dataset: Dataset,
        version: str,
        model: Model,
        metrics: Sequence[str],
        total: int,
        batch: int,
        timeout_ms: int | None,
    ) -> Iterator[pb.EvaluateModelResponse]:
        started = self.clock()
        truth = dataset.labels[:total]
        predicted = np.zeros_like(truth)
        values: dict[str, float] = {}
        for index, begin in enumerate(range(0, total, batch), 1):
            end = min(begin + batch, total)
            predicted[begin:end] = model.predict(dataset.features[begin:end])
            values = _metrics.compute(dataset.task, metrics, truth[:end], predicted[:end], dataset.classes)
            if timeout_ms is not None and (self.clock() - started) * 1000 > timeout_ms:
                context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"evaluation exceeded its {timeout_ms} ms after {end} of {total} samples",
                )
            yield pb.EvaluateModelResponse(
                progress=pb.EvaluationProgress(
                    batch=index, samples_done=end, samples_total=total, metrics=values
                )
            )
        if envelope_grpc.current_envelope() is not None:  # else served without the envelope interceptor
            envelope_grpc.record_usage(Usage(items=total))
        yield pb.EvaluateModelResponse(
            result=pb.EvaluationResult(
                model=request.model,
                model_version=version,
                dataset=dataset.name,
                samples_evaluated=total,
                metrics=values,
            )
        )
