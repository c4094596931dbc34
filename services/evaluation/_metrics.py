"""Evaluation metrics, computed with numpy.

Classification metrics are macro averages over every class of the dataset
(a class never predicted has precision 0, one never present has recall 0);
regression metrics follow the usual definitions (r2 of a constant target is
1 for a perfect fit, else 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from services.evaluation._catalog import Task

Array = npt.NDArray[np.float64] | npt.NDArray[np.int64]


def _per_class(truth: Array, predicted: Array, classes: int) -> tuple[Array, Array, Array]:
    """True positives, false positives and false negatives of each class."""
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    tp = np.diag(confusion)
    return tp, confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp


def _ratio(numerator: Array, denominator: Array) -> float:
    safe = np.where(denominator > 0, denominator, 1)
    return float(np.mean(np.where(denominator > 0, numerator / safe, 0.0)))


def accuracy(truth: Array, predicted: Array, classes: int) -> float:
    """Share of samples predicted right."""
    return int(np.count_nonzero(truth == predicted)) / len(truth)


def precision(truth: Array, predicted: Array, classes: int) -> float:
    """Macro-averaged precision."""
    tp, fp, _ = _per_class(truth, predicted, classes)
    return _ratio(tp, tp + fp)


def recall(truth: Array, predicted: Array, classes: int) -> float:
    """Macro-averaged recall."""
    tp, _, fn = _per_class(truth, predicted, classes)
    return _ratio(tp, tp + fn)


def f1(truth: Array, predicted: Array, classes: int) -> float:
    """Macro-averaged F1: 2·TP / (2·TP + FP + FN) per class."""
    tp, fp, fn = _per_class(truth, predicted, classes)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def mse(truth: Array, predicted: Array, classes: int) -> float:
    """Mean squared error."""
    return float(np.mean((predicted - truth) ** 2))


def rmse(truth: Array, predicted: Array, classes: int) -> float:
    """Root mean squared error."""
    return math.sqrt(mse(truth, predicted, classes))


def mae(truth: Array, predicted: Array, classes: int) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(predicted - truth)))


def r2(truth: Array, predicted: Array, classes: int) -> float:
    """Coefficient of determination."""
    residual = float(np.sum((truth - predicted) ** 2))
    total = float(np.sum((truth - np.mean(truth)) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


Metric = Callable[[Array, Array, int], float]

#: Every metric, by task and name.
METRICS: Final[Mapping[Task, Mapping[str, Metric]]] = {
    Task.CLASSIFICATION: {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1},
    Task.REGRESSION: {"mse": mse, "rmse": rmse, "mae": mae, "r2": r2},
}
#: Every metric name.
ALL: Final = frozenset(name for table in METRICS.values() for name in table)


def compute(
    task: Task, names: Sequence[str], truth: Array, predicted: Array, classes: int
) -> dict[str, float]:
    """The named metrics of ``predicted`` against ``truth``."""
    table = METRICS[task]
    return {name: table[name](truth, predicted, classes) for name in names}
