"""Restricted unpickling of params trees (the reference's VQGAN `vqgan_params.pkl`).

A pickle can call any importable function while it loads (`os.system`, `eval`, ...),
so a params file from elsewhere is code, unless the unpickler refuses every global
that plain numpy arrays in nested dicts do not need. `find_class` below admits only
numpy's array/dtype/scalar reconstructors and a few harmless container builtins;
anything else raises `CheckpointError` before it can be called. The loaded tree is
then checked to hold only dicts/lists of numeric numpy arrays.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric  # type: ignore

from lwm_serve.model.params_file import CheckpointError

logger = logging.getLogger(__name__)

# numpy >= 2 moved numpy.core to numpy._core (numpy.core still works, with a warning):
# both spellings resolve to the same, current objects.
_NUMPY_GLOBALS = {
    "multiarray._reconstruct": _multiarray._reconstruct,
    "multiarray.scalar": _multiarray.scalar,
    # protocol-5 pickles of arrays rebuild them from a buffer
    "numeric._frombuffer": _numeric._frombuffer,
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 0-2 pickles spell `bytes` as `_codecs.encode(str, "latin1")`; any other
    codec name is refused (codec lookup can import modules)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.{mod}", name): obj
       for core in ("core", "_core")
       for (mod_name, obj) in _NUMPY_GLOBALS.items()
       for mod, name in [mod_name.split(".")]},
    # numpy >= 1.25 pickles dtypes by their class, e.g. numpy.dtypes.Float32DType
    **{("numpy.dtypes", type(np.dtype(t)).__name__): type(np.dtype(t))
       for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "float16", "float32", "float64")},
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("collections", "OrderedDict"): dict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals numpy arrays in dicts need."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to unpickle global {module}.{name}: params pickles may only "
                f"hold numpy arrays in plain containers") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing a pickle with persistent ids (not a params tree)")


def _check_tree(node: Any, where: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"unexpected key {key!r} at {where or '/'}")
            _check_tree(value, f"{where}/{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_tree(value, f"{where}/{i}")
    elif isinstance(node, np.ndarray):
        if node.dtype.hasobject:
            raise CheckpointError(f"object array at {where}: not a params tree")
    elif not isinstance(node, (np.generic, int, float, bool)) and node is not None:
        raise CheckpointError(f"unexpected {type(node).__name__} at {where}")


def loads_pickle_params(data: bytes) -> Any:
    """Unpickle params from bytes with the restricted unpickler (see module doc)."""
    try:
        tree = RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated/corrupt pickles raise many different types
        raise CheckpointError(f"corrupt or truncated params pickle: "
                              f"{type(e).__name__}: {e}") from None
    _check_tree(tree)
    return tree


def load_pickle_params(path: str | os.PathLike) -> dict:
    """Load a pickled params tree (nested dicts of numpy arrays) without running code.

    Raises:
        CheckpointError: a refused global (named), a corrupt file, or a tree holding
            anything but containers and numeric arrays.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read params pickle {path}: {e}") from None
    try:
        tree = loads_pickle_params(data)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a dict of params, got {type(tree).__name__}")
    logger.info("loaded params pickle %s (%.1f MB)", path, len(data) / 1e6)
    return tree
