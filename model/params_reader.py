"""Streaming reader of the reference's `params::` files (format: `params_file.py`).

A tiny msgpack-subset decoder reads the structural parts (keys, shapes, dtype names);
each tensor's raw bytes go with `readinto` straight into its final numpy array, so a
tensor costs its own size once. Every declared length is checked against the bytes
left before anything is allocated, and every error names the record, key and offset.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from lwm_serve.model.params_file import (
    CHUNKED_MARKER,
    DTYPES,
    FLAX_NDARRAY_EXT,
    CheckpointError,
    Path,
    join_path,
    parse_spec,
)

# Structural msgpack values (keys, shapes, dtype names) are tiny; anything larger is
# corruption, refused before allocating.
_MAX_SMALL_BYTES = 1 << 20
_MAX_DEPTH = 8


class _Stream:
    """A binary file read sequentially, with its offset for error messages."""

    def __init__(self, f: BinaryIO, size: int, name: str):
        self.f, self.size, self.name, self.pos = f, size, name, 0
        self.record = 0
        self.key: Path | None = None

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def where(self, offset: int | None = None) -> str:
        key = f" (key {join_path(self.key)})" if self.key else ""
        return f"record #{self.record}{key} at byte {self.pos if offset is None else offset}"

    def error(self, what: str, offset: int | None = None) -> CheckpointError:
        return CheckpointError(f"{self.name}: {what} in {self.where(offset)}")

    def truncated(self, need: int) -> CheckpointError:
        return CheckpointError(
            f"{self.name}: file is truncated (or corrupt): {self.where()} needs {need} more "
            f"bytes but the file ends at byte {self.size} ({self.remaining} left)")

    def read(self, n: int) -> bytes:
        if n > self.remaining:
            raise self.truncated(n)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise self.truncated(n)
        self.pos += n
        return data

    def readinto(self, buf: np.ndarray) -> None:
        """Fill a C-contiguous array's bytes from the file (no intermediate copy)."""
        view = memoryview(buf.reshape(-1).view(np.uint8))
        n = len(view)
        if n > self.remaining:
            raise self.truncated(n)
        got = 0
        while got < n:
            k = self.f.readinto(view[got:])
            if not k:
                raise self.truncated(n - got)
            got += k
        self.pos += n

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.read(nbytes), "big")


def _read_container_len(s: _Stream, marker: int, fix_base: int, n16: int, n32: int) -> int | None:
    if fix_base <= marker <= fix_base + 15:
        return marker - fix_base
    if marker == n16:
        return s.uint(2)
    if marker == n32:
        return s.uint(4)
    return None


def _read_blob_len(s: _Stream, marker: int) -> int | None:
    """Length of a bin or str value, or None if `marker` starts neither."""
    if 0xA0 <= marker <= 0xBF:
        return marker - 0xA0
    if marker in (0xC4, 0xD9):
        return s.uint(1)
    if marker in (0xC5, 0xDA):
        return s.uint(2)
    if marker in (0xC6, 0xDB):
        return s.uint(4)
    return None


def _read_small(s: _Stream, depth: int = 0) -> Any:
    """Decode one small msgpack value (keys, shapes, dtype names, flags)."""
    if depth > _MAX_DEPTH:
        raise s.error("msgpack nesting too deep (corrupt data?)")
    start = s.pos
    marker = s.read(1)[0]
    if marker <= 0x7F:
        return marker
    if marker >= 0xE0:
        return marker - 0x100
    if marker == 0xC0:
        return None
    if marker in (0xC2, 0xC3):
        return marker == 0xC3
    ints = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
            0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}
    if marker in ints:
        n, signed = ints[marker]
        return int.from_bytes(s.read(n), "big", signed=signed)
    if marker == 0xCA:
        return struct.unpack(">f", s.read(4))[0]
    if marker == 0xCB:
        return struct.unpack(">d", s.read(8))[0]
    n = _read_blob_len(s, marker)
    if n is not None:
        if n > _MAX_SMALL_BYTES:
            raise s.error(f"unexpected {n}-byte string (corrupt data?)", start)
        raw = s.read(n)
        if marker in (0xC4, 0xC5, 0xC6):
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise s.error("invalid UTF-8 in a string (corrupt data?)", start) from None
    n = _read_container_len(s, marker, 0x90, 0xDC, 0xDD)
    if n is not None:
        if n > s.remaining:
            raise s.truncated(n)
        return [_read_small(s, depth + 1) for _ in range(n)]
    n = _read_container_len(s, marker, 0x80, 0xDE, 0xDF)
    if n is not None:
        if 2 * n > s.remaining:
            raise s.truncated(2 * n)
        return {_hashable(s, _read_small(s, depth + 1)): _read_small(s, depth + 1)
                for _ in range(n)}
    raise s.error(f"unexpected msgpack byte 0x{marker:02x} (corrupt data or not a "
                  f"params:: checkpoint)", start)


def _hashable(s: _Stream, key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise s.error("unexpected map key (corrupt data?)")
    return key


def _read_ext_header(s: _Stream, marker: int) -> tuple[int, int] | None:
    """(ext type, payload length) if `marker` starts an ext value, else None."""
    fixed = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
    if marker in fixed:
        n = fixed[marker]
    elif marker in (0xC7, 0xC8, 0xC9):
        n = s.uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[marker])
    else:
        return None
    return s.read(1)[0], n


@dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    end: int  # offset where the ext value ends


def _read_array_header(s: _Stream, marker: int | None = None) -> _ArrayHeader:
    """Parse a flax ndarray ext up to (not including) its raw data bytes.

    `marker` is the ext's first byte when the caller has already consumed it.
    """
    start = s.pos if marker is None else s.pos - 1
    ext = _read_ext_header(s, s.read(1)[0] if marker is None else marker)
    if ext is None:
        raise s.error("expected a flax ndarray (msgpack ext type 1)", start)
    code, length = ext
    if code != FLAX_NDARRAY_EXT:
        raise s.error(f"unsupported msgpack ext type {code} (flax ndarray is type 1)", start)
    end = s.pos + length
    if end > s.size:
        raise s.truncated(length)
    marker = s.read(1)[0]
    if _read_container_len(s, marker, 0x90, 0xDC, 0xDD) != 3:
        raise s.error("unexpected ndarray structure (expected [shape, dtype, data])", start)
    shape = _read_small(s)
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise s.error(f"invalid array shape {shape!r}", start)
    name = _read_small(s)
    if isinstance(name, bytes):  # writers without use_bin_type store str as raw
        name = name.decode("utf-8", "replace")
    if not isinstance(name, str):
        raise s.error(f"invalid dtype name {name!r}", start)
    if name not in DTYPES:
        raise s.error(f"unknown dtype {name!r} (known: {sorted(DTYPES)})", start)
    dtype = DTYPES[name]
    marker = s.read(1)[0]
    nbytes = _read_blob_len(s, marker)
    if nbytes is None:
        raise s.error("expected the array's raw bytes (msgpack bin)", start)
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise s.error(f"data length {nbytes} does not match shape {tuple(shape)} x "
                      f"{name} ({expected} bytes)", start)
    if s.pos + nbytes != end:
        raise s.error(f"ndarray ext length {length} does not match its content", start)
    return _ArrayHeader(tuple(shape), dtype, nbytes, end)


HeaderCheck = Callable[[Path, tuple[int, ...], np.dtype], None]


def _read_chunked(s: _Stream, n_entries: int, check: HeaderCheck | None) -> np.ndarray:
    """Read flax's chunked-array map; chunks go straight into the final array."""
    start = s.pos
    shape: tuple[int, ...] | None = None
    out: np.ndarray | None = None
    flagged = False
    for _ in range(n_entries):
        name = _read_small(s)
        if name == CHUNKED_MARKER:
            flagged = _read_small(s) is True
        elif name == "shape":
            dims = _read_small(s)
            if (not isinstance(dims, dict) or set(dims) != {str(i) for i in range(len(dims))}
                    or not all(type(v) is int and v >= 0 for v in dims.values())):
                raise s.error(f"invalid chunked-array shape {dims!r}", start)
            shape = tuple(dims[str(i)] for i in range(len(dims)))
        elif name == "chunks":
            if shape is None:
                raise s.error("chunked array lists 'chunks' before 'shape'", start)
            out = _read_chunks(s, shape, check)
        else:
            raise s.error(f"unexpected field {name!r} in a chunked array", start)
    if not flagged or out is None:
        raise s.error("unexpected record structure (a map that is not a flax chunked "
                      "array)", start)
    return out.reshape(shape)


def _read_chunks(s: _Stream, shape: tuple[int, ...], check: HeaderCheck | None) -> np.ndarray:
    start = s.pos
    n = _read_container_len(s, s.read(1)[0], 0x80, 0xDE, 0xDF)
    if n is None:
        raise s.error("chunked array 'chunks' is not a map", start)
    total = math.prod(shape)
    out: np.ndarray | None = None
    filled = 0
    for i in range(n):
        if _read_small(s) != str(i):
            raise s.error(f"chunk keys out of order (expected {str(i)!r})", start)
        head = _read_array_header(s)
        if out is None:
            if check is not None and s.key is not None:
                check(s.key, shape, head.dtype)
            if total * head.dtype.itemsize > s.remaining:
                raise s.truncated(total * head.dtype.itemsize)
            out = np.empty(total, head.dtype)
        if head.dtype != out.dtype or len(head.shape) != 1:
            raise s.error("chunks of a chunked array differ in dtype or are not 1-D", start)
        count = head.shape[0]
        if filled + count > total:
            raise s.error(f"chunks hold more than the {total} elements of shape {shape}", start)
        s.readinto(out[filled:filled + count])
        filled += count
    if out is None:  # an empty array has no chunks; the dtype is unknowable
        raise s.error("chunked array without chunks", start)
    if filled != total:
        raise s.error(f"chunks hold {filled} elements, shape {shape} needs {total}", start)
    return out


def _read_record(s: _Stream, check: HeaderCheck | None) -> tuple[Path, np.ndarray]:
    start = s.pos
    s.key = None
    marker = s.read(1)[0]
    if _read_container_len(s, marker, 0x90, 0xDC, 0xDD) != 2:
        raise s.error(f"byte 0x{marker:02x} where a record ([key, value], msgpack array "
                      f"of 2) should start: corrupt data or not a params:: checkpoint", start)
    key = _read_small(s)
    if not isinstance(key, list) or not key or not all(isinstance(k, str) for k in key):
        raise s.error(f"record key {key!r} is not a non-empty list of strings", start)
    s.key = tuple(key)
    value_start = s.pos
    length = _read_blob_len(s, s.read(1)[0])
    if length is None:
        raise s.error("record value is not a msgpack bin (flax to_bytes)", value_start)
    if length > s.remaining:
        raise s.truncated(length)
    end = s.pos + length
    marker = s.read(1)[0]
    n_map = _read_container_len(s, marker, 0x80, 0xDE, 0xDF)
    if n_map is not None:
        array = _read_chunked(s, n_map, check)
    else:
        head = _read_array_header(s, marker)
        if check is not None:
            check(s.key, head.shape, head.dtype)
        array = np.empty(head.shape, head.dtype)
        s.readinto(array)
    if s.pos != end:
        raise s.error(f"record value declares {length} bytes but its content is "
                      f"{s.pos - (end - length)} bytes", value_start)
    return s.key, array


def _open(path: str) -> tuple[BinaryIO, int]:
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory, not a params file: "
                              f"{path}") from None
    return f, os.fstat(f.fileno()).st_size


class ParamsReader:
    """An open `params::` file, read record by record.

    Use as a context manager and iterate it; `offset` and `size` give progress.

    Args:
        path: the file, or a `params::PATH` spec.
        check: called with (key, shape, dtype) after each record's header and before
            its data is read, so a mismatch fails without reading the tensor.
    """

    def __init__(self, path: str | os.PathLike, check: HeaderCheck | None = None):
        self.path = parse_spec(path)
        self._check = check
        f, size = _open(self.path)
        self._stream = _Stream(f, size, self.path)

    @property
    def size(self) -> int:
        return self._stream.size

    @property
    def offset(self) -> int:
        return self._stream.pos

    def __enter__(self) -> "ParamsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream.f.close()

    def __iter__(self) -> Iterator[tuple[Path, np.ndarray]]:
        s = self._stream
        while s.pos < s.size:
            yield _read_record(s, self._check)
            s.record += 1


def iter_params_file(path: str | os.PathLike) -> Iterator[tuple[Path, np.ndarray]]:
    """Stream a `params::` file one record at a time.

    Args:
        path: the file (or a `params::PATH` spec).

    Yields:
        (key path without the leading "params", array in the file's dtype), in file
        order. Only the current array is held in memory.

    Raises:
        CheckpointError: truncated or corrupt file, unexpected structure, unknown dtype,
            data length not matching shape x itemsize.
    """
    with ParamsReader(path) as reader:
        yield from reader
