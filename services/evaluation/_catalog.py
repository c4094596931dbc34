"""The built-in labelled datasets and models, generated deterministically with
numpy: every service instance (and every test) sees the same numbers.

Each dataset has an evaluation split (what the service evaluates on); each
model was fitted, when the catalog was built, on a separate training draw of
the same distribution, so its metrics are real and not perfect.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from envelope_grpc.v1.envelope_pb2 import DataClassification

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


class Task(enum.Enum):
    """What a dataset's labels are."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled dataset: ``features`` (samples x features) and ``labels``
    (class indexes for classification, values for regression)."""

    name: str
    task: Task
    classification: DataClassification.ValueType
    features: Floats
    labels: Floats | Ints
    classes: int = 0

    def __len__(self) -> int:
        return int(self.features.shape[0])


class Model(Protocol):
    """A fitted model."""

    @property
    def task(self) -> Task:
        """What it predicts."""
        ...

    @property
    def features(self) -> int:
        """Number of features it reads."""
        ...

    @property
    def classes(self) -> int:
        """Number of classes (0 for regression)."""
        ...

    def predict(self, features: Floats, /) -> Floats | Ints:
        """Predicted labels of ``features`` (samples x features)."""
        ...


@dataclasses.dataclass(frozen=True)
class NearestCentroid:
    """Predicts the class whose centroid is nearest (squared Euclidean)."""

    centroids: Floats  # classes x features
    task: Task = Task.CLASSIFICATION

    @property
    def features(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def classes(self) -> int:
        return int(self.centroids.shape[0])

    def predict(self, features: Floats, /) -> Ints:
        distances = ((features[:, None, :] - self.centroids[None, :, :]) ** 2).sum(axis=2)
        return np.asarray(np.argmin(distances, axis=1), dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """Predicts the class with the highest linear score ``x @ weights + bias``."""

    weights: Floats  # features x classes
    bias: Floats  # classes
    task: Task = Task.CLASSIFICATION

    @property
    def features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def classes(self) -> int:
        return int(self.weights.shape[1])

    def predict(self, features: Floats, /) -> Ints:
        return np.asarray(np.argmax(features @ self.weights + self.bias, axis=1), dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class LinearRegressor:
    """Predicts ``x @ weights + bias``."""

    weights: Floats  # features
    bias: float
    task: Task = Task.REGRESSION
    classes: int = 0

    @property
    def features(self) -> int:
        return int(self.weights.shape[0])

    def predict(self, features: Floats, /) -> Floats:
        return np.asarray(features @ self.weights + self.bias, dtype=np.float64)


# -- generators -----------------------------------------------------------------------

_IRIS_MEANS: Final = np.array([[5.0, 3.4, 1.5, 0.25], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.5, 2.0]])
_IRIS_STDS: Final = np.array([[0.35, 0.38, 0.17, 0.1], [0.52, 0.31, 0.47, 0.2], [0.64, 0.32, 0.55, 0.27]])
_HOUSING_WEIGHTS: Final = np.array([2.0, -1.5, 0.5])
_HOUSING_BIAS: Final = 3.0


def iris_like(seed: int, per_class: int) -> tuple[Floats, Ints]:
    """Four features, three overlapping Gaussian classes, shuffled."""
    rng = np.random.default_rng(seed)
    features = np.concatenate(
        [rng.normal(_IRIS_MEANS[c], _IRIS_STDS[c], size=(per_class, 4)) for c in range(3)]
    )
    labels = np.repeat(np.arange(3, dtype=np.int64), per_class)
    order = rng.permutation(features.shape[0])
    return features[order], labels[order]


def claims_binary(seed: int, per_class: int) -> tuple[Floats, Ints]:
    """Six features, two overlapping Gaussian classes, shuffled."""
    rng = np.random.default_rng(seed)
    features = np.concatenate(
        [rng.normal(0.0, 1.0, size=(per_class, 6)), rng.normal(0.8, 1.0, size=(per_class, 6))]
    )
    labels = np.repeat(np.arange(2, dtype=np.int64), per_class)
    order = rng.permutation(features.shape[0])
    return features[order], labels[order]


def housing(seed: int, samples: int) -> tuple[Floats, Floats]:
    """Three uniform features, a linear target with Gaussian noise."""
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.0, 1.0, size=(samples, 3))
    labels = features @ _HOUSING_WEIGHTS + _HOUSING_BIAS + rng.normal(0.0, 0.3, size=samples)
    return features, labels


def fit_centroids(features: Floats, labels: Ints, classes: int) -> NearestCentroid:
    """Class means."""
    return NearestCentroid(np.stack([features[labels == c].mean(axis=0) for c in range(classes)]))


def fit_linear_classifier(features: Floats, labels: Ints, classes: int) -> LinearClassifier:
    """Least squares on one-hot targets."""
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    solution, *_ = np.linalg.lstsq(design, np.eye(classes)[labels], rcond=None)
    weights = np.asarray(solution, dtype=np.float64)
    return LinearClassifier(weights[:-1], weights[-1])


def fit_linear_regressor(features: Floats, labels: Floats) -> LinearRegressor:
    """Ordinary least squares."""
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    solution, *_ = np.linalg.lstsq(design, labels, rcond=None)
    weights = np.asarray(solution, dtype=np.float64)
    return LinearRegressor(weights[:-1], float(weights[-1]))


# -- the catalog ------------------------------------------------------------------------

_PUBLIC: Final = DataClassification.DATA_CLASSIFICATION_PUBLIC
_INTERNAL: Final = DataClassification.DATA_CLASSIFICATION_INTERNAL
_CONFIDENTIAL: Final = DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Datasets by name; models by name, then version (in release order)."""

    datasets: Mapping[str, Dataset]
    models: Mapping[str, Mapping[str, Model]]

    def model(self, name: str, version: str) -> tuple[str, Model] | None:
        """The model and its version; an empty version means the latest."""
        versions = self.models.get(name)
        if not versions:
            return None
        if not version:
            version = list(versions)[-1]
        found = versions.get(version)
        return (version, found) if found is not None else None


def builtin() -> Catalog:
    """The built-in catalog."""
    iris_x, iris_y = iris_like(seed=1, per_class=50)
    claims_x, claims_y = claims_binary(seed=2, per_class=150)
    housing_x, housing_y = housing(seed=3, samples=200)
    datasets = {
        "iris-like": Dataset("iris-like", Task.CLASSIFICATION, _PUBLIC, iris_x, iris_y, 3),
        "claims-binary": Dataset("claims-binary", Task.CLASSIFICATION, _CONFIDENTIAL, claims_x, claims_y, 2),
        "housing-regression": Dataset("housing-regression", Task.REGRESSION, _INTERNAL, housing_x, housing_y),
    }
    small_x, small_y = iris_like(seed=101, per_class=5)
    large_x, large_y = iris_like(seed=102, per_class=200)
    train_claims_x, train_claims_y = claims_binary(seed=103, per_class=500)
    train_housing_x, train_housing_y = housing(seed=104, samples=500)
    models: dict[str, dict[str, Model]] = {
        "iris-centroid": {
            "1": fit_centroids(small_x, small_y, 3),
            "2": fit_centroids(large_x, large_y, 3),
        },
        "iris-linear": {"1": fit_linear_classifier(large_x, large_y, 3)},
        "claims-linear": {"1": fit_linear_classifier(train_claims_x, train_claims_y, 2)},
        "housing-linear": {"1": fit_linear_regressor(train_housing_x, train_housing_y)},
    }
    return Catalog(datasets, models)
