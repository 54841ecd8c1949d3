import numpy as np
import pytest

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import TensorError, from_tensor, to_tensor


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64])
def test_round_trip_keeps_values_shape_and_dtype(dtype):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    back = from_tensor(pb.Tensor.FromString(to_tensor(array).SerializeToString()))
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_wire_format_is_little_endian_c_order():
    tensor = to_tensor(np.array([[1, 2], [3, 4]], dtype=">i4").T)  # big-endian, Fortran-ordered view
    assert tensor.dtype == pb.DATA_TYPE_INT32
    assert list(tensor.shape) == [2, 2]
    assert tensor.data == np.array([1, 3, 2, 4], dtype="<i4").tobytes()


def test_decoding_does_not_copy():
    tensor = to_tensor(np.ones((3, 3), np.float32))
    assert not from_tensor(tensor).flags.owndata


def test_byte_count_must_match_shape():
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(TensorError, match="needs 24 bytes, got 20"):
        from_tensor(tensor)


def test_unknown_dtypes_are_rejected():
    with pytest.raises(TensorError):
        to_tensor(np.zeros(2, dtype=np.complex64))
    with pytest.raises(TensorError):
        from_tensor(pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[0]))
