"""Writer of the reference's `params::` files, byte for byte as tux's StreamingCheckpointer.

The format is in `params_file.py`. `msgpack` packs the structural parts; each array
is written straight from its buffer (no copy of the data).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import msgpack
import numpy as np

from lwm_serve.model.params_file import (
    CHUNKED_MARKER,
    DTYPES,
    FLAX_NDARRAY_EXT,
    MAX_CHUNK_SIZE,
    CheckpointError,
    flatten_params,
    is_float_dtype,
    parse_spec,
)


def _bin_header(n: int) -> bytes:
    if n <= 0xFF:
        return b"\xc4" + n.to_bytes(1, "big")
    if n <= 0xFFFF:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _ext_header(code: int, n: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        head = bytes([fixed[n]])
    elif n <= 0xFF:
        head = b"\xc7" + n.to_bytes(1, "big")
    elif n <= 0xFFFF:
        head = b"\xc8" + n.to_bytes(2, "big")
    else:
        head = b"\xc9" + n.to_bytes(4, "big")
    return head + bytes([code])


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _ndarray_parts(array: np.ndarray) -> list[bytes | memoryview]:
    """flax `_msgpack_ext_pack` of one array: ext 1 of [shape, dtype name, bytes]."""
    data = memoryview(array.reshape(-1).view(np.uint8))
    inner = [b"\x93", _packb(list(array.shape)), _packb(array.dtype.name),
             _bin_header(data.nbytes), data]
    length = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in inner)
    return [_ext_header(FLAX_NDARRAY_EXT, length), *inner]


def _to_bytes_parts(array: np.ndarray, chunk_threshold: int) -> list[bytes | memoryview]:
    """`flax.serialization.to_bytes(array)` as pieces (data not copied)."""
    if array.size * array.dtype.itemsize <= chunk_threshold:
        return _ndarray_parts(array)
    packer = msgpack.Packer(use_bin_type=True)
    size = max(1, int(chunk_threshold / array.dtype.itemsize))
    flat = array.reshape(-1)
    chunks = [flat[i:i + size] for i in range(0, flat.size, size)]
    parts: list[bytes | memoryview] = [
        packer.pack_map_header(3), _packb(CHUNKED_MARKER), _packb(True),
        _packb("shape"), _packb({str(i): d for i, d in enumerate(array.shape)}),
        _packb("chunks"), packer.pack_map_header(len(chunks))]
    for i, chunk in enumerate(chunks):
        parts += [_packb(str(i)), *_ndarray_parts(chunk)]
    return parts


def _as_host_array(value: Any, float_dtype: np.dtype | None) -> np.ndarray:
    array = np.asarray(value)
    if float_dtype is not None and is_float_dtype(array.dtype):
        array = array.astype(float_dtype)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype.name not in DTYPES:
        raise CheckpointError(f"cannot save dtype {array.dtype.name}")
    # not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
    return array if array.flags.c_contiguous else array.copy(order="C")


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *,
                float_dtype: str | np.dtype | None = None,
                chunk_threshold: int = MAX_CHUNK_SIZE) -> None:
    """Write a `params::` file exactly as the reference's StreamingCheckpointer does.

    Records follow the tree's iteration order; arrays over `chunk_threshold` bytes use
    flax's chunked-array form. Each array is written straight from its buffer.

    Args:
        path: output file (or a `params::PATH` spec).
        params: nested dict of arrays, WITHOUT the leading "params" key.
        float_dtype: if given, floating arrays are cast to it first (tux's float_dtype).
        chunk_threshold: flax's MAX_CHUNK_SIZE; lowered only by tests.
    """
    target = None if float_dtype is None else np.dtype(float_dtype)
    out = parse_spec(path)
    with open(out, "wb") as f:
        for key, value in flatten_params(params):
            array = _as_host_array(value, target)
            parts = _to_bytes_parts(array, chunk_threshold)
            length = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
            f.write(b"\x92" + _packb(list(key)) + _bin_header(length))
            for part in parts:
                f.write(part)
