"""The upload format: exact round trip, hash = sha256 of the encoding, clear errors."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medmllm.geometry.volume import Volume
from medmllm.geometry.wire import (
    MAGIC,
    MAX_HEADER_BYTES,
    WireError,
    decode_volume,
    encode_volume,
    volume_sha256,
)
from test_geometry_support import oblique_grids, shapes

dtypes = st.sampled_from(["bool", "uint8", "int8", "int16", "uint16", "int32", "float32", "float64"])
LIMIT = 10**8


@settings(max_examples=40, deadline=None)
@given(shapes, dtypes, oblique_grids(), st.integers(0, 2**32 - 1))
def test_round_trip_is_exact_and_hash_is_sha256_of_the_bytes(shape, dtype, matrix, seed):
    voxels = (np.random.default_rng(seed).random(shape) * 200 - 100).astype(dtype)
    data = encode_volume((voxels, matrix))
    back, back_matrix = decode_volume(data, LIMIT)
    assert back.dtype == voxels.dtype and np.array_equal(back, voxels)
    assert np.array_equal(back_matrix, matrix)
    assert volume_sha256(voxels, matrix) == hashlib.sha256(data).hexdigest()
    assert encode_volume(Volume.from_array(voxels, matrix)) == data


def test_header_is_one_json_line_then_raw_little_endian_voxels():
    voxels = np.arange(6, dtype=np.int16).reshape(1, 2, 3)
    data = encode_volume((voxels, np.eye(4)))
    header, body = data.split(b"\n", 1)
    assert json.loads(header) == {
        "magic": MAGIC,
        "dtype": "<i2",
        "shape": [1, 2, 3],
        "ijk_to_ras": np.eye(4).tolist(),
    }
    assert body == voxels.astype("<i2").tobytes()


def test_layout_and_byte_order_do_not_change_the_identity():
    voxels = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    matrix = np.diag([1.0, 2.0, 3.0, 1.0])
    reference = volume_sha256(voxels, matrix)
    assert volume_sha256(voxels.astype(">i2"), matrix) == reference
    fortran = np.asfortranarray(voxels)
    assert volume_sha256(fortran, matrix) == reference
    assert encode_volume((fortran, matrix)) == encode_volume((voxels, matrix))
    negative_zero = matrix.copy()
    negative_zero[0, 1] = -0.0
    assert volume_sha256(voxels, negative_zero) == reference
    assert volume_sha256(voxels + 1, matrix) != reference
    shifted = matrix.copy()
    shifted[0, 3] = 1e-9
    assert volume_sha256(voxels, shifted) != reference


def test_hash_does_not_copy_the_voxels():
    voxels = np.zeros((64, 256, 256), dtype=np.int16)  # 8 MiB
    tracemalloc.start()
    try:
        volume_sha256(voxels, np.eye(4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < voxels.nbytes / 8


def test_decoded_voxels_are_a_view_on_the_upload():
    data = bytearray(encode_volume((np.zeros((2, 3, 4), dtype=np.float32), np.eye(4))))
    voxels, _ = decode_volume(data, LIMIT)
    assert np.shares_memory(voxels, np.frombuffer(data, dtype=np.uint8))


def _good() -> bytes:
    return encode_volume((np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)))


def _with_header(**changes) -> bytes:
    header, body = _good().split(b"\n", 1)
    fields = json.loads(header)
    fields.update(changes)
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_good()[:-1], "truncated: header says .* = 48 bytes, body has 47"),
        (_good() + b"\x00\x00", "shape/dtype mismatch"),
        (b"GIF89a" + _good(), "bad magic"),
        (b"", "bad magic"),
        (_with_header(magic="other/1"), "bad magic"),
        (b'{"magic":"' + b"x" * MAX_HEADER_BYTES, "header too long"),
        (b'{"magic": nope}\n', "not valid JSON"),
        (_with_header(dtype="|O"), "dtype"),
        (_with_header(dtype="<c16"), "dtype"),
        (_with_header(shape=[2, 3]), "3 positive integers"),
        (_with_header(shape=[2, 3, 0]), "3 positive integers"),
        (_with_header(shape=[2, 3, 2]), "shape/dtype mismatch"),
        (_with_header(shape=[2, 3, 5]), "truncated"),
        (_with_header(dtype="<i4"), "truncated"),
        (_with_header(ijk_to_ras=[[1, 0], [0, 1]]), "4x4"),
        (_with_header(ijk_to_ras="eye"), "4x4"),
        (_with_header(shape=[1000, 1000, 1000]), "over the limit"),
        (_with_header(shape=[2**40, 2**40, 2**40]), "over the limit"),
    ],
)
def test_bad_uploads_get_clear_errors(data, message):
    with pytest.raises(WireError, match=message):
        decode_volume(data, LIMIT)


def test_size_limit_applies_to_the_upload():
    with pytest.raises(WireError, match="exceeds the limit of 100 bytes"):
        decode_volume(_good(), 100)


def test_encode_refuses_what_cannot_be_a_volume():
    with pytest.raises(WireError, match="3-D"):
        encode_volume((np.zeros((2, 2)), np.eye(4)))
    with pytest.raises(WireError, match="cannot be uploaded"):
        encode_volume((np.zeros((2, 2, 2), dtype=complex), np.eye(4)))
    with pytest.raises(WireError, match="4x4"):
        volume_sha256(np.zeros((2, 2, 2)), np.eye(3))
    with pytest.raises(WireError, match="finite 4x4"):
        encode_volume((np.zeros((2, 2, 2)), np.full((4, 4), np.nan)))
    with pytest.raises(WireError, match="Volume or a"):
        encode_volume("volume.nrrd")
