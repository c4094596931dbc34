"""Small real models computed with numpy, from fixed built-in weights.

Nothing is downloaded or trained at start-up: every weight is a literal or a
closed-form expression, so the outputs are the same on every machine.

- ``iris-classifier`` version 1: multinomial logistic regression over the four
  iris measurements (sepal length, sepal width, petal length, petal width, in
  cm) giving probabilities of setosa, versicolor, virginica. Version 2: a
  4-6-3 ReLU network whose hidden units are petal/sepal thresholds.
- ``text-embedder``: the hashing trick (signed counts of word tokens in 256
  buckets) and a fixed 256x32 projection, L2-normalized.
- ``tiny-lm``: a greedy next-token generator over a 24-word vocabulary, with a
  fixed transition matrix, a prompt bias, a repetition penalty and a rising
  end-of-sequence score; at most ``max_tokens`` tokens per prompt.

Token-limited models (the embedder and the LM) take the request parameter
``max_tokens`` per input string, capped at the model's own ``token_limit``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final, TypeAlias

import numpy as np
import numpy.typing as npt

Array: TypeAlias = npt.NDArray[Any]
F64: TypeAlias = npt.NDArray[np.float64]

#: Platform reported in model metadata and runtime in bindings.
PLATFORM: Final = "numpy"


@dataclasses.dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: name, KServe v2 datatype and shape, -1 for
    any size (the first dimension is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(slots=True)
class Result:
    """A model's outputs by name, and the tokens it consumed or produced."""

    outputs: dict[str, Array]
    tokens: int | None = None


class Model(abc.ABC):
    """One version of a model."""

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]
    platform: ClassVar[str] = PLATFORM
    #: Most tokens per input string; None when the model does not count tokens.
    token_limit: ClassVar[int | None] = None
    #: Tokens per input string when the caller sets no max_tokens.
    default_tokens: ClassVar[int | None] = None

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, Array], max_tokens: int | None) -> Result:
        """Compute the outputs of a validated batch. ``max_tokens`` (per input
        string, already capped at ``token_limit``) is None for models that
        count no tokens."""


# -- iris ------------------------------------------------------------------------


#: Version 1: logistic regression, logits = features @ IRIS_LR_WEIGHTS.T + IRIS_LR_BIAS.
IRIS_LR_WEIGHTS: Final[F64] = np.array(
    [
        [-0.42, 0.97, -2.52, -1.08],
        [0.53, -0.32, -0.21, -0.94],
        [-0.11, -0.65, 2.73, 2.02],
    ]
)
IRIS_LR_BIAS: Final[F64] = np.array([9.85, 2.24, -12.09])

#: Version 2: hidden = relu(features @ IRIS_MLP_W1.T + IRIS_MLP_B1), logits =
#: hidden @ IRIS_MLP_W2.T + IRIS_MLP_B2. Hidden units: 2.5 - petal length,
#: petal length - 2.5, petal length - 4.9, petal width - 1.6, 1.7 - petal width,
#: sepal length - 6.0.
IRIS_MLP_W1: Final[F64] = np.array(
    [
        [0.0, 0.0, -1.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, -1.0],
        [1.0, 0.0, 0.0, 0.0],
    ]
)
IRIS_MLP_B1: Final[F64] = np.array([2.5, -2.5, -4.9, -1.6, 1.7, -6.0])
IRIS_MLP_W2: Final[F64] = np.array(
    [
        [4.0, -1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 1.2, -3.0, -4.0, 1.0, 0.0],
        [0.0, 0.6, 3.0, 4.0, -1.0, 0.2],
    ]
)
IRIS_MLP_B2: Final[F64] = np.array([1.0, -0.5, -1.5])


def softmax(logits: F64) -> F64:
    """Row-wise softmax, shifted by the row maximum."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: F64 = exp / exp.sum(axis=1, keepdims=True)
    return result


class _Iris(Model):
    name = "iris-classifier"
    inputs = (TensorSpec("features", "FP32", (-1, 4)),)
    outputs = (
        TensorSpec("probabilities", "FP32", (-1, 3)),
        TensorSpec("label", "INT64", (-1,)),
    )

    @abc.abstractmethod
    def logits(self, features: F64) -> F64:
        """Class scores of a (batch, 4) float64 array."""

    def run(self, inputs: Mapping[str, Array], max_tokens: int | None) -> Result:
        probabilities = softmax(self.logits(inputs["features"].astype(np.float64)))
        return Result(
            {
                "probabilities": probabilities.astype(np.float32),
                "label": probabilities.argmax(axis=1).astype(np.int64),
            }
        )


class IrisLogistic(_Iris):
    """iris-classifier version 1: logistic regression."""

    version = "1"

    def logits(self, features: F64) -> F64:
        result: F64 = features @ IRIS_LR_WEIGHTS.T + IRIS_LR_BIAS
        return result


class IrisMlp(_Iris):
    """iris-classifier version 2: a 4-6-3 ReLU network."""

    version = "2"

    def logits(self, features: F64) -> F64:
        hidden = np.maximum(features @ IRIS_MLP_W1.T + IRIS_MLP_B1, 0.0)
        result: F64 = hidden @ IRIS_MLP_W2.T + IRIS_MLP_B2
        return result


# -- text -----------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9']+")
_GOLDEN: Final = (math.sqrt(5.0) - 1.0) / 2.0


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens."""
    return _WORD.findall(text.lower())


def _hash(token: str) -> int:
    return zlib.crc32(token.encode("utf-8"))


def _pseudo_random(rows: int, columns: int, offset: int) -> F64:
    """cos(2*pi*frac((i + 1) * (j + offset) * golden ratio)): a fixed matrix
    with values spread over [-1, 1] and no random generator involved."""
    product = np.outer(np.arange(1, rows + 1), np.arange(offset, columns + offset)).astype(np.float64)
    result: F64 = np.cos(2.0 * math.pi * np.modf(product * _GOLDEN)[0])
    return result


HASH_BUCKETS: Final = 256
EMBEDDING_DIM: Final = 32
#: The embedder's projection from hashed counts to the embedding.
EMBED_PROJECTION: Final[F64] = _pseudo_random(HASH_BUCKETS, EMBEDDING_DIM, 1) / math.sqrt(EMBEDDING_DIM)


def hashed_counts(tokens: Sequence[str]) -> F64:
    """Signed counts of ``tokens`` in HASH_BUCKETS buckets (bit 16 of the
    CRC-32 gives the sign)."""
    counts = np.zeros(HASH_BUCKETS)
    for token in tokens:
        value = _hash(token)
        counts[value % HASH_BUCKETS] += -1.0 if (value >> 16) & 1 else 1.0
    return counts


def _texts(array: Array) -> list[str]:
    return [bytes(item).decode("utf-8", "replace") for item in array.reshape(-1)]


class TextEmbedder(Model):
    """text-embedder version 1: hashing trick and a fixed projection."""

    name = "text-embedder"
    version = "1"
    inputs = (TensorSpec("text", "BYTES", (-1,)),)
    outputs = (
        TensorSpec("embedding", "FP32", (-1, EMBEDDING_DIM)),
        TensorSpec("num_tokens", "INT64", (-1,)),
    )
    token_limit = 128
    default_tokens = 128

    def run(self, inputs: Mapping[str, Array], max_tokens: int | None) -> Result:
        limit = self.token_limit if max_tokens is None else max_tokens
        texts = _texts(inputs["text"])
        embeddings = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        counted = np.zeros(len(texts), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = tokenize(text)[:limit]
            vector = hashed_counts(tokens) @ EMBED_PROJECTION
            norm = float(np.linalg.norm(vector))
            embeddings[row] = vector / norm if norm > 0.0 else vector
            counted[row] = len(tokens)
        return Result({"embedding": embeddings, "num_tokens": counted}, tokens=int(counted.sum()))


LM_VOCAB: Final = (
    "<eos>",
    "the",
    "model",
    "data",
    "agent",
    "plan",
    "tool",
    "result",
    "token",
    "graph",
    "search",
    "answer",
    "vector",
    "query",
    "step",
    "budget",
    "trace",
    "span",
    "grant",
    "envelope",
    "policy",
    "tenant",
    "batch",
    "infer",
)
LM_EOS: Final = 0
#: Next-token scores by previous token: LM_TRANSITION[previous, next].
LM_TRANSITION: Final[F64] = _pseudo_random(len(LM_VOCAB), len(LM_VOCAB), 2)
#: Weight of the prompt's token frequencies in every step's scores.
LM_PROMPT_WEIGHT: Final = 0.5
#: Subtracted from a token's score for each time it was generated already.
LM_REPEAT_PENALTY: Final = 1.5
#: The end-of-sequence score at step s is LM_EOS_BASE + LM_EOS_RAMP * s.
LM_EOS_BASE: Final = -1.0
LM_EOS_RAMP: Final = 0.2


def lm_token_id(word: str) -> int:
    """A word's vocabulary id; words outside the vocabulary hash onto it
    (never onto <eos>)."""
    if word in LM_VOCAB[1:]:
        return LM_VOCAB.index(word)
    return 1 + _hash(word) % (len(LM_VOCAB) - 1)


def lm_generate(prompt: str, max_tokens: int) -> list[int]:
    """Greedy generation: the ids of at most ``max_tokens`` tokens, without
    the end-of-sequence token that stopped it."""
    ids = [lm_token_id(word) for word in tokenize(prompt)]
    bag = np.zeros(len(LM_VOCAB))
    for token in ids:
        bag[token] += 1.0
    if ids:
        bag /= len(ids)
    previous = ids[-1] if ids else LM_EOS
    generated: list[int] = []
    seen = np.zeros(len(LM_VOCAB))
    for step in range(max_tokens):
        scores = LM_TRANSITION[previous] + LM_PROMPT_WEIGHT * bag - LM_REPEAT_PENALTY * seen
        scores[LM_EOS] = LM_EOS_BASE + LM_EOS_RAMP * step
        token = int(np.argmax(scores))
        if token == LM_EOS:
            break
        generated.append(token)
        seen[token] += 1.0
        previous = token
    return generated


class TinyLm(Model):
    """tiny-lm version 1: a toy greedy generator."""

    name = "tiny-lm"
    version = "1"
    inputs = (TensorSpec("prompt", "BYTES", (-1,)),)
    outputs = (
        TensorSpec("text", "BYTES", (-1,)),
        TensorSpec("token_ids", "INT64", (-1, -1)),
        TensorSpec("num_tokens", "INT64", (-1,)),
    )
    token_limit = 64
    default_tokens = 16

    def run(self, inputs: Mapping[str, Array], max_tokens: int | None) -> Result:
        limit = self.default_tokens if max_tokens is None else max_tokens
        assert limit is not None
        sequences = [lm_generate(prompt, limit) for prompt in _texts(inputs["prompt"])]
        width = max((len(ids) for ids in sequences), default=0)
        token_ids = np.full((len(sequences), width), -1, dtype=np.int64)
        for row, ids in enumerate(sequences):
            token_ids[row, : len(ids)] = ids
        text = np.array(
            [" ".join(LM_VOCAB[token] for token in ids).encode("utf-8") for ids in sequences] or [],
            dtype=np.object_,
        )
        counts = np.array([len(ids) for ids in sequences], dtype=np.int64)
        return Result(
            {"text": text, "token_ids": token_ids, "num_tokens": counts},
            tokens=int(counts.sum()),
        )


# -- the repository ------------------------------------------------------------------


class Repository:
    """Models by name and version; an empty version means the latest."""

    def __init__(self, models: Sequence[Model]) -> None:
        self._models: dict[str, dict[str, Model]] = {}
        for model in models:
            self._models.setdefault(model.name, {})[model.version] = model

    def names(self) -> list[str]:
        """Model names, sorted."""
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        """The versions of ``name``, oldest first; empty when unknown."""
        return sorted(self._models.get(name, {}), key=lambda version: (len(version), version))

    def get(self, name: str, version: str = "") -> Model | None:
        """The model, or None when the name or version is unknown."""
        versions = self._models.get(name)
        if not versions:
            return None
        if not version:
            return versions[self.versions(name)[-1]]
        return versions.get(version)


def default_repository() -> Repository:
    """Every built-in model."""
    return Repository([IrisLogistic(), IrisMlp(), TextEmbedder(), TinyLm()])
