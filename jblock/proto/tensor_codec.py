"""numpy arrays <-> jblock.v1.Tensor (dtype name, shape, little-endian C-order bytes)."""

from typing import Mapping

import ml_dtypes
import numpy as np

from jblock.errors import InvalidRequestError
from jblock.proto import jblock_pb2


def _dtype_from_name(name: str) -> np.dtype:
  # numpy does not know ml_dtypes' names (bfloat16, float8_*) by string.
  extra = getattr(ml_dtypes, name, None)
  try:
    dtype = np.dtype(extra) if extra is not None else np.dtype(name)
  except TypeError:
    raise InvalidRequestError("tensor", f"unknown dtype {name!r}") from None
  if dtype.hasobject or dtype.fields is not None:
    raise InvalidRequestError("tensor", f"dtype {name!r} is not a plain numeric dtype")
  return dtype


def to_tensor(array) -> jblock_pb2.Tensor:
  """Any array-like (numpy, jax) to a Tensor; big-endian input is stored little-endian."""
  array = np.asarray(array)
  if array.dtype.hasobject or array.dtype.fields is not None:
    raise InvalidRequestError("tensor", f"cannot encode dtype {array.dtype}")
  little = array.astype(array.dtype.newbyteorder("<"), copy=False)
  return jblock_pb2.Tensor(dtype=array.dtype.name, shape=array.shape,
                           data=np.ascontiguousarray(little).tobytes())


def from_tensor(tensor: jblock_pb2.Tensor) -> np.ndarray:
  """A Tensor back to a writable numpy array of the same dtype and shape."""
  dtype = _dtype_from_name(tensor.dtype).newbyteorder("<")
  shape = tuple(tensor.shape)
  if any(d < 0 for d in shape):
    raise InvalidRequestError("tensor", f"negative dimension in shape {shape}")
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(tensor.data) != expected:
    raise InvalidRequestError(
        "tensor", f"{len(tensor.data)} bytes of data for shape {shape} of {tensor.dtype} "
        f"(expected {expected})")
  array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=True)


def to_tensor_map(arrays: Mapping[str, object], target) -> None:
  """Fills a proto map<string, Tensor> field (e.g. RunBlockRequest.inputs) from arrays."""
  for name, array in arrays.items():
    target[name].CopyFrom(to_tensor(array))


def from_tensor_map(tensors) -> dict[str, np.ndarray]:
  return {name: from_tensor(tensor) for name, tensor in tensors.items()}
