"""The reference's `params::` checkpoint file format, shared by its reader and writer.

File format (tux `StreamingCheckpointer`, byte by byte in the fixture README §3): a
plain concatenation of msgpack records, no header, footer or index. Each record is

    [key: array of str, value: bin]          (msgpack array of 2)

and `value` is `flax.serialization.to_bytes(array)`: either an ext type 1 whose payload
is `[shape, dtype name, raw C-order little-endian bytes]`, or, for arrays over 2**30
bytes, a map `{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...},
"chunks": {"0": ext1, ...}}` of 1-D ext arrays to concatenate.

Reading is in `params_reader.py`, writing in `params_writer.py`; this module holds
what both share: the format's constants, its dtypes, and the tree helpers.

Why a hand-written reader rather than `msgpack.Unpacker`: the only large objects are
raw byte strings, and the Unpacker would hold each one up to three times (its read
buffer, the `bytes` object it returns, the concatenation of chunks): ~9 GB for one
2.9 GB feed-forward kernel of LWM-7B. Here the small structural parts (keys, shapes,
dtype names) go through a tiny msgpack-subset decoder and the data bytes are read with
`readinto` straight into the final numpy array, so a tensor costs its own size once;
every declared length is checked against the bytes left before anything is allocated,
and every error names the record, key and byte offset. The writer uses `msgpack`
itself for the structural parts; tests check it reproduces the reference files byte
for byte. Placement on devices and config checks live in `checkpoint.py`.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

Path = tuple[str, ...]
Params = dict[str, Any]

SPEC_PREFIX = "params::"
# flax.serialization.MAX_CHUNK_SIZE: arrays of strictly more bytes are chunked.
MAX_CHUNK_SIZE = 2**30
FLAX_NDARRAY_EXT = 1
CHUNKED_MARKER = "__msgpack_chunked_array__"

DTYPES: dict[str, np.dtype] = {
    **{name: np.dtype(name).newbyteorder("<") for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64")},
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}

_ML_FLOATS = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}


class CheckpointError(ValueError):
    """A checkpoint file or tree is unreadable, corrupt, or does not match the config."""


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for numpy floats and ml_dtypes' (bfloat16, float8), which numpy does not
    count as `np.floating`."""
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.floating)) or dtype.name in _ML_FLOATS


def flatten_params(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) pairs of a nested dict in its iteration order, depth first."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten_params(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def unflatten_params(items: Mapping[Path, Any]) -> Params:
    tree: Params = {}
    for path, value in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def join_path(path: Path) -> str:
    return "/".join(path)


def parse_spec(spec: str | os.PathLike) -> str:
    """`params::PATH` (the reference's --load_checkpoint) or a plain path -> path."""
    text = os.fspath(spec)
    if text.startswith(SPEC_PREFIX):
        return text[len(SPEC_PREFIX):]
    kind, sep, _ = text.partition("::")
    if sep and kind.isidentifier():
        raise CheckpointError(
            f"unsupported checkpoint spec {kind!r}:: (only params::PATH, the streaming "
            f"params file, is supported)")
    return text
