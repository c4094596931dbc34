"""KServe v2 tensors: datatypes, decoding request inputs, encoding outputs.

Inputs come either all in ``raw_input_contents`` (little-endian bytes; BYTES
elements each prefixed by a 4-byte little-endian length) or each in its typed
``contents`` field. Outputs are always sent raw, as Triton does.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from services.inference.models import Array

_NUMPY: Final[dict[str, str]] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
#: Element size in bytes of every fixed-size datatype.
DATATYPE_SIZES: Final[dict[str, int]] = {name: np.dtype(code).itemsize for name, code in _NUMPY.items()}
#: Every datatype this server decodes.
DATATYPES: Final = frozenset({*DATATYPE_SIZES, "BYTES"})
#: The InferTensorContents field holding each datatype (FP16 only travels raw).
_CONTENTS: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor that cannot be decoded; the message is for the caller."""


def element_count(shape: Sequence[int]) -> int:
    """Elements in a tensor of ``shape``; raises TensorError on a negative dimension."""
    if any(dim < 0 for dim in shape):
        raise TensorError(f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def contents_bytes(tensor: Any) -> int:
    """Size in bytes of one input's typed contents, counted as its raw
    encoding would be: element count x datatype size, or, for BYTES, each
    element's length plus its 4-byte length prefix."""
    if tensor.datatype == "BYTES":
        return sum(len(item) + _LENGTH.size for item in tensor.contents.bytes_contents)
    return element_count(tensor.shape) * DATATYPE_SIZES.get(tensor.datatype, 0)


def decode_bytes(raw: bytes, count: int, name: str) -> Array:
    """Length-prefixed BYTES elements into a numpy object array."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise TensorError(f"input '{name}': truncated BYTES length prefix at byte {offset}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise TensorError(f"input '{name}': BYTES element {len(items)} runs past the end of the data")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise TensorError(f"input '{name}': shape needs {count} BYTES elements, the data holds {len(items)}")
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


def encode_bytes(array: Array) -> bytes:
    """A BYTES tensor as length-prefixed elements."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_input(tensor: Any, raw: bytes | None) -> Array:
    """One request input as a numpy array of its shape; ``raw`` is its entry
    of raw_input_contents, or None when its values are in ``contents``."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    if datatype not in DATATYPES:
        raise TensorError(f"input '{name}': unsupported datatype {datatype!r}")
    count = element_count(shape)
    if raw is not None:
        if datatype == "BYTES":
            return decode_bytes(raw, count, name).reshape(shape)
        expected = count * DATATYPE_SIZES[datatype]
        if len(raw) != expected:
            raise TensorError(
                f"input '{name}': shape {list(shape)} of {datatype} needs {expected} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=_NUMPY[datatype]).reshape(shape)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise TensorError(f"input '{name}': {datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise TensorError(f"input '{name}': shape {list(shape)} needs {count} values, got {len(values)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=_NUMPY[datatype]).reshape(shape)
    except OverflowError as error:
        raise TensorError(f"input '{name}': a value does not fit {datatype}") from error


def decode_inputs(request: Any) -> dict[str, Array]:
    """Every input of a ModelInferRequest by name."""
    raw_contents = list(request.raw_input_contents)
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise TensorError(
            f"raw_input_contents holds {len(raw_contents)} entries for {len(request.inputs)} inputs"
        )
    decoded: dict[str, Array] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in decoded:
            raise TensorError(f"input '{tensor.name}' is given twice")
        decoded[tensor.name] = decode_input(tensor, raw_contents[index] if raw_contents else None)
    return decoded


def encode_output(response: Any, name: str, datatype: str, array: Array) -> None:
    """Append one output tensor, raw, to a ModelInferResponse."""
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if datatype == "BYTES":
        response.raw_output_contents.append(encode_bytes(array))
    else:
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=_NUMPY[datatype]).tobytes())


__all__ = [
    "DATATYPES",
    "DATATYPE_SIZES",
    "TensorError",
    "contents_bytes",
    "decode_bytes",
    "decode_input",
    "decode_inputs",
    "element_count",
    "encode_bytes",
    "encode_output",
]
