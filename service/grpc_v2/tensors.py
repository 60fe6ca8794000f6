"""Conversion between v2 (Open Inference Protocol) tensors and numpy arrays.

Everything arriving here comes from the network, so every size is checked before memory is
touched: dims must be non-negative, the element count is bounded by ``max_elements`` (checked
with Python integers, so a hostile shape cannot overflow), and the payload length must match
shape x datatype exactly. Raw contents are little-endian and row-major, as the protocol says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.grpc_v2 import grpc_predict_v2_pb2 as pb

InferOutputTensor = pb.ModelInferResponse.InferOutputTensor

#: Upper bound on elements per tensor when the caller does not choose one (64 MiB of FP32).
DEFAULT_MAX_ELEMENTS = 16 * 1024 * 1024

#: v2 datatype -> little-endian numpy dtype. BYTES and BF16 are not supported: no numeric
#: model of this project takes them, and numpy has no bfloat16.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# Typed ``contents`` field of each datatype (FP16 has none: raw only, per the protocol).
_CONTENTS_FIELD: dict[str, str] = {
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
}
_ALL_CONTENTS_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)
_KIND_TO_DATATYPE = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}


class TensorError(ValueError):
    """A tensor is malformed; the message names the tensor and is safe to return to the client."""

    code = "invalid_tensor"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype name of a numpy dtype (byte order ignored)."""
    name = _KIND_TO_DATATYPE.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise TensorError(f"numpy dtype {dtype} has no supported v2 datatype")
    return name


def element_count(name: str, shape: Sequence[int], max_elements: int) -> int:
    """Validate a shape from the wire and return its element count."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise TensorError(f"tensor '{name}': shape {dims} has a negative dimension")
    count = math.prod(dims)
    if count > max_elements:
        raise TensorError(
            f"tensor '{name}': shape {dims} has {count} elements, more than the limit "
            f"{max_elements}"
        )
    return count


def _dtype(name: str, datatype: str) -> np.dtype:
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        supported = ", ".join(DATATYPES)
        raise TensorError(f"tensor '{name}': datatype '{datatype}' unsupported ({supported})")
    return dtype


def raw_to_numpy(
    name: str,
    datatype: str,
    shape: Sequence[int],
    raw: bytes,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """Decode little-endian row-major bytes. The result is read-only (zero copy on LE hosts)."""
    dtype = _dtype(name, datatype)
    count = element_count(name, shape, max_elements)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"tensor '{name}': raw contents have {len(raw)} bytes, expected {expected} "
            f"(shape {list(shape)} x {datatype})"
        )
    if datatype == "BOOL":
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        if as_bytes.size and int(as_bytes.max()) > 1:
            raise TensorError(f"tensor '{name}': BOOL raw contents must be bytes 0 or 1")
    array = np.frombuffer(raw, dtype=dtype).reshape([int(d) for d in shape])
    return array.astype(dtype.newbyteorder("="), copy=False)


def _contents_to_numpy(
    name: str, datatype: str, shape: Sequence[int], contents: Any, max_elements: int
) -> np.ndarray:
    dtype = _dtype(name, datatype)
    count = element_count(name, shape, max_elements)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"tensor '{name}': {datatype} must be sent as raw contents")
    wrong = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(contents, f))]
    if wrong:
        raise TensorError(f"tensor '{name}': {datatype} data must be in {field}, not {wrong[0]}")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(
            f"tensor '{name}': {field} has {len(values)} values, expected {count} "
            f"(shape {list(shape)})"
        )
    if datatype in ("INT8", "INT16", "UINT8", "UINT16") and count:
        # int_contents / uint_contents are 32-bit on the wire: refuse values that would wrap.
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise TensorError(f"tensor '{name}': {field} has values outside the {datatype} range")
    return np.asarray(values, dtype=dtype.newbyteorder("=")).reshape([int(d) for d in shape])


def _has_contents(tensor: Any) -> bool:
    if not tensor.HasField("contents"):
        return False
    return any(len(getattr(tensor.contents, f)) for f in _ALL_CONTENTS_FIELDS)


def to_numpy(
    tensor: Any, raw: bytes | None, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """Decode an ``InferInputTensor`` (or ``InferOutputTensor``) into a numpy array.

    ``raw`` is the tensor's entry of ``raw_input_contents`` (``None`` when the request uses the
    typed ``contents`` fields). Raises :class:`TensorError` on any inconsistency.
    """
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if raw is not None:
        if _has_contents(tensor):
            raise TensorError(f"tensor '{name}': both raw contents and typed contents given")
        return raw_to_numpy(name, datatype, shape, raw, max_elements=max_elements)
    if not _has_contents(tensor):
        _dtype(name, datatype)
        if element_count(name, shape, max_elements) == 0:
            return np.empty([int(d) for d in shape], dtype=DATATYPES[datatype])
        raise TensorError(f"tensor '{name}': no data (neither raw nor typed contents)")
    return _contents_to_numpy(name, datatype, shape, tensor.contents, max_elements)


def encode(array: Any) -> tuple[str, list[int], bytes]:
    """``(datatype, shape, little-endian row-major bytes)`` of an array-like."""
    arr = np.asarray(array)
    datatype = datatype_of(arr.dtype)
    little = np.ascontiguousarray(arr, dtype=DATATYPES[datatype])
    return datatype, list(arr.shape), little.tobytes()


def from_numpy(name: str, array: Any) -> tuple[InferOutputTensor, bytes]:
    """An output tensor header and its ``raw_output_contents`` entry."""
    datatype, shape, raw = encode(array)
    return InferOutputTensor(name=name, datatype=datatype, shape=shape), raw
