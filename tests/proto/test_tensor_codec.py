"""numpy <-> Tensor round trips, bfloat16 included, and rejection of malformed tensors."""

import ml_dtypes
import numpy as np
import pytest

from jblock.errors import InvalidRequestError
from jblock.proto import tensor_codec
from jblock.proto import jblock_pb2


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    np.array([[1.5, -2.25, 3.0e38], [0.0, -0.0, np.inf]], dtype=ml_dtypes.bfloat16),
    np.array([1.0, 448.0, -0.5], dtype=ml_dtypes.float8_e4m3fn),
    np.arange(-5, 5, dtype=np.int64),
    np.array([0, 2**31 - 1], dtype=">i4"),  # big-endian input
    np.arange(12, dtype=np.float16).reshape(3, 4).T,  # not C-contiguous
    np.array([True, False, True]),
    np.array(7, dtype=np.int32),  # 0-d
    np.zeros((0, 3), dtype=np.uint8),
], ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_round_trip_keeps_dtype_shape_and_bytes(array):
  tensor = tensor_codec.to_tensor(array)
  # Over the wire too.
  decoded = tensor_codec.from_tensor(jblock_pb2.Tensor.FromString(tensor.SerializeToString()))
  assert decoded.dtype == array.dtype.newbyteorder("=")
  assert decoded.shape == array.shape
  assert decoded.tobytes() == np.ascontiguousarray(array.astype(decoded.dtype)).tobytes()
  assert decoded.flags.writeable
  assert len(tensor.data) == array.size * array.dtype.itemsize


def test_bfloat16_wire_format_is_little_endian_bits():
  tensor = tensor_codec.to_tensor(np.array([1.0, -2.0], dtype=ml_dtypes.bfloat16))
  assert tensor.dtype == "bfloat16" and list(tensor.shape) == [2]
  assert tensor.data == bytes([0x80, 0x3F, 0x00, 0xC0])  # 0x3F80, 0xC000


def test_tensor_maps_fill_proto_map_fields():
  inputs = {"hidden": np.ones((2, 5), dtype=ml_dtypes.bfloat16),
            "positions": np.array([3, 4], dtype=np.int32)}
  request = jblock_pb2.RunBlockRequest(block_id="b")
  tensor_codec.to_tensor_map(inputs, request.inputs)
  decoded = tensor_codec.from_tensor_map(
      jblock_pb2.RunBlockRequest.FromString(request.SerializeToString()).inputs)
  assert decoded.keys() == inputs.keys()
  for name, array in inputs.items():
    np.testing.assert_array_equal(decoded[name], array)
    assert decoded[name].dtype == array.dtype


@pytest.mark.parametrize("tensor, phrase", [
    (jblock_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "15 bytes"),
    (jblock_pb2.Tensor(dtype="float99", shape=[1], data=b"\0" * 4), "unknown dtype"),
    (jblock_pb2.Tensor(dtype="object", shape=[1], data=b"\0" * 8), "not a plain numeric"),
    (jblock_pb2.Tensor(dtype="int8", shape=[-1], data=b""), "negative dimension"),
])
def test_malformed_tensors_are_invalid_arguments(tensor, phrase):
  with pytest.raises(InvalidRequestError, match=phrase) as e:
    tensor_codec.from_tensor(tensor)
  assert e.value.field == "tensor"


def test_object_arrays_cannot_be_encoded():
  with pytest.raises(InvalidRequestError):
    tensor_codec.to_tensor(np.array([object()]))
