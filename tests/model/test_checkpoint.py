"""Checkpoint I/O: the reference's params:: files, HF LLaMA safetensors, pickles.

The params:: tests run on every reference set (tests/model/conftest.py) and check
our reader and writer against flax.serialization, the library that defines the
record format (a test-only dependency).
"""

import json
import logging
import os
import pickle
import re
import subprocess
from pathlib import Path

import jax
import ml_dtypes
import msgpack
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lwm_serve.model import checkpoint as ck
from lwm_serve.model import params as params_lib
from lwm_serve.model import params_file, params_writer
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.unpickle import load_pickle_params, loads_pickle_params


# ----------------------------------------------------------------------------- helpers
# Every fixture test takes `reference_set` (tests/model/conftest.py): the public set and
# a generated one of other sizes and layouts. Facts come from each set's config.json and
# manifest.json (each file's own layout and dtype), never from the public set's values.


def _layout_of(keys) -> bool | None:
    """True scanned, False per-layer, from record keys alone (None: no layer records)."""
    layer_keys = [k for k in keys if tuple(k[:2]) == ("transformer", "h")]
    if not layer_keys:
        return None
    return all(k[2] == ck.SCAN_KEY for k in layer_keys)


def _all_param_files(rs) -> list[str]:
    return list(rs.files) + ([rs.demo_file] if rs.demo_file else [])


def _raw_records(path: Path) -> list[tuple[tuple[str, ...], bytes]]:
    """(key, value bytes) per record, split by msgpack's own Unpacker (independent of ours)."""
    with open(path, "rb") as f:
        return [(tuple(k), v) for k, v in msgpack.Unpacker(f, max_buffer_size=2**31 - 1)]


def _record_bounds(path: Path) -> list[int]:
    """Record end offsets, found with msgpack's own Unpacker (independent of ours)."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, max_buffer_size=2**31 - 1)
        bounds = []
        for _ in unpacker:
            bounds.append(unpacker.tell())
    return bounds


def _first_record_offsets(data: bytes) -> dict[str, int]:
    """Byte offsets inside the first record, from the format (README §3), not a literal."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(data[1:4096])
    key = next(unpacker)
    bin_at = 1 + len(msgpack.packb(key, use_bin_type=True))
    bin_len_bytes = {0xC4: 1, 0xC5: 2, 0xC6: 4}[data[bin_at]]
    ext_at = bin_at + 1 + bin_len_bytes
    ext_type_at = ext_at + {0xC7: 2, 0xC8: 3, 0xC9: 5, 0xD4: 1, 0xD5: 1, 0xD6: 1, 0xD7: 1,
                            0xD8: 1}[data[ext_at]]
    return {"bin_len_at": bin_at + 1, "ext_type_at": ext_type_at}


def _small_tree(rng: np.random.Generator) -> dict:
    return {
        "a": {"f32": rng.standard_normal((3, 5)).astype(np.float32),
              "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)},
        "b": {"i32": np.arange(7, dtype=np.int32), "f16": np.ones((2, 2), np.float16),
              "bool": np.array([True, False]), "scalar": np.array(2.5, np.float32),
              "empty": np.zeros((0, 3), np.float32)},
    }


# ----------------------------------------------------------------------------- the sets


def test_reference_set_is_complete(reference_set):
    """What every other test here relies on: guarded, so a missing file fails."""
    rs = reference_set
    layouts = {(f["scan_layers"], f["float_dtype"]) for f in rs.files.values()}
    assert {(True, "fp32"), (False, "fp32")} <= layouts
    assert rs.files[rs.bf16_file]["scan_layers"] == rs.manifest["primary_scan_layers"]
    assert rs.demo is not None and rs.path(rs.demo_file).is_file()
    for name in rs.files:
        assert rs.path(name).is_file(), name
    cases = rs.case_dirs()  # raises on a case without data.npz
    assert len(rs.forward_runs()) >= 2 and rs.generation_cases()
    checked = {d for d, _ in rs.forward_runs()} | set(rs.generation_cases())
    # every case with arrays is either checked by the model tests or is the VQGAN case
    assert {d.name for d in cases if d not in checked} <= {"vqgan"}


def test_case_without_data_fails_instead_of_vanishing(reference_set, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(reference_set.root / "cases", copy / "cases")
    shutil.copytree(reference_set.model_dir, copy / "model")
    victim = next(iter(reference_set.generation_cases()))
    (copy / "cases" / victim.name / "data.npz").unlink()
    broken = type(reference_set)("broken", copy)
    with pytest.raises(FileNotFoundError, match=victim.name):
        broken.forward_runs()


# ----------------------------------------------------------------------------- reading


def test_files_match_manifest(reference_set):
    rs = reference_set
    for name, entry in rs.files.items():
        records = rs.arrays(name)
        got = [("/".join(k), list(v.shape), v.dtype.name) for k, v in records.items()]
        assert got == [(a["key"], a["shape"], a["dtype"]) for a in entry["arrays"]], name
        assert len(records) == entry["n_arrays"]
        assert rs.path(name).stat().st_size == entry["bytes"], name
        assert _layout_of(records) == entry["scan_layers"], name
        want_dtype = {"fp32": "float32", "bf16": "bfloat16"}[entry["float_dtype"]]
        assert {v.dtype.name for v in records.values()} == {want_dtype}, name


def test_reader_agrees_with_flax(reference_set):
    """flax.serialization (the library that defines the record values) decodes every
    record of every file the same way as our reader."""
    from flax import serialization

    rs = reference_set
    for name in _all_param_files(rs):
        raw = _raw_records(rs.path(name))
        ours = rs.arrays(name)
        assert list(ours) == [k for k, _ in raw], name
        for key, value in raw:
            oracle = serialization.msgpack_restore(value)
            assert isinstance(oracle, np.ndarray), (name, key)
            assert ours[key].dtype == oracle.dtype and ours[key].shape == oracle.shape, (name, key)
            np.testing.assert_array_equal(ours[key], oracle)


def test_files_are_what_flax_writes(reference_set, monkeypatch):
    """Each file equals its records written with flax.serialization.to_bytes (with the
    demo's chunk threshold for the chunked demo), and so does our writer's output."""
    from flax import serialization

    rs = reference_set
    for name in _all_param_files(rs):
        threshold = (rs.demo["max_chunk_size_bytes_used"] if name == rs.demo_file
                     else params_file.MAX_CHUNK_SIZE)
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", threshold)
        want = b"".join(msgpack.packb([list(k), serialization.to_bytes(v)], use_bin_type=True)
                        for k, v in rs.arrays(name).items())
        assert rs.path(name).read_bytes() == want, name


def test_layouts_hold_the_same_weights(reference_set):
    rs = reference_set
    cfg = rs.config()
    scan, per_layer = rs.arrays(rs.fp32_file(True)), rs.arrays(rs.fp32_file(False))
    axis = rs.manifest["param_scan_axis"]
    for key, value in scan.items():
        if key[:3] == ("transformer", "h", ck.SCAN_KEY):
            layers = [per_layer[("transformer", "h", str(i), *key[3:])]
                      for i in range(cfg.num_hidden_layers)]
            np.testing.assert_array_equal(value, np.stack(layers, axis=axis))
        else:
            np.testing.assert_array_equal(value, per_layer[key])
    n_layer_keys = sum(k[:3] == ("transformer", "h", ck.SCAN_KEY) for k in scan)
    assert len(per_layer) == len(scan) - n_layer_keys + n_layer_keys * cfg.num_hidden_layers


def test_bf16_file_is_its_layouts_fp32_rounded(reference_set):
    rs = reference_set
    name = rs.bf16_file
    entry = rs.files[name]
    source = rs.arrays(rs.fp32_file(entry["scan_layers"]))
    params = ck.load_params(f"params::{rs.path(name)}", rs.file_config(name), dtype="float32",
                            progress=False)
    flat = dict(ck.flatten_params(params))
    assert set(flat) == set(source)
    for key, value in flat.items():
        assert value.dtype == np.float32
        want = source[key].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(value), want)


def test_bf16_file_loads_as_bf16_without_cast(reference_set):
    params = ck.load_params(reference_set.path(reference_set.bf16_file), progress=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_chunked_demo_reads_its_sources(reference_set):
    rs = reference_set
    got = rs.arrays(rs.demo_file)
    records = rs.demo["records_in_file_order"]
    assert ["/".join(k) for k in got] == [r["key"] for r in records]
    raw = {"/".join(k): msgpack.unpackb(v, raw=False, strict_map_key=False,
                                        ext_hook=lambda c, d: None)
           for k, v in _raw_records(rs.path(rs.demo_file))}
    assert any(r["chunked"] for r in records) and not all(r["chunked"] for r in records)
    for record in records:
        value = got[tuple(record["key"].split("/"))]
        assert list(value.shape) == record["shape"] and value.dtype.name == record["dtype"]
        source = Path(record["source"].split()[0]).name  # "model/<file> (same key)..."
        want = rs.arrays(source)[tuple(record["key"].split("/"))].astype(record["dtype"])
        np.testing.assert_array_equal(value, want)
        # the file really uses the chunked form where the json says so
        assert isinstance(raw[record["key"]], dict) == record["chunked"]
        if record["chunked"]:
            assert len(raw[record["key"]]["chunks"]) == record["n_chunks"]


def test_either_layout_loads_whatever_the_config_says(reference_set, caplog):
    """A params file's own records say whether it is scanned; the loader follows them,
    checks shapes against that layout, and logs which one it found."""
    rs = reference_set
    for name, entry in rs.files.items():
        for cfg_scan in (True, False):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="lwm_serve.model.checkpoint"):
                params = ck.load_params(rs.path(name), rs.config(cfg_scan), progress=False)
            flat = dict(ck.flatten_params(params))
            assert {k: tuple(v.shape) for k, v in flat.items()} == \
                ck.expected_param_shapes(rs.config(), scan_layers=entry["scan_layers"])
            assert all(isinstance(v, jax.Array) for v in flat.values())
            assert params_lib.is_scanned(params) == entry["scan_layers"]
            layout = "scanned" if entry["scan_layers"] else "per-layer"
            assert any(f"{layout} layer layout (config scan_layers={cfg_scan})" in r.getMessage()
                       for r in caplog.records), (name, cfg_scan)
            # and serving's conversion gives the per-layer tree either way
            per_layer, compute_cfg = params_lib.unstack_layers(params, rs.config(cfg_scan))
            assert not compute_cfg.scan_layers and not params_lib.is_scanned(per_layer)


def test_a_file_mixing_layouts_is_refused(reference_set, tmp_path):
    rs = reference_set
    mixed = {**rs.arrays(rs.fp32_file(False)), **rs.arrays(rs.fp32_file(True))}
    ck.save_params(tmp_path / "mixed", ck.unflatten_params(mixed))
    with pytest.raises(ck.CheckpointError, match="unexpected parameter transformer/h/.*mixes "
                                                 "layer layouts"):
        ck.load_params(tmp_path / "mixed", rs.config(), progress=False)


def test_iteration_is_streaming(reference_set, tmp_path):
    rs = reference_set
    src = rs.path(rs.demo_file)
    first_end = _record_bounds(src)[0]
    bad = tmp_path / "bad"
    bad.write_bytes(src.read_bytes()[:first_end] + b"\xc1" * 64)
    records = ck.iter_params_file(bad)
    key, _ = next(records)  # the first record is returned before the rest is read
    assert "/".join(key) == rs.demo["records_in_file_order"][0]["key"]
    with pytest.raises(ck.CheckpointError, match=r"record #1 .*byte %d" % first_end):
        next(records)


# ----------------------------------------------------------------------------- writing


def test_save_reproduces_every_file(reference_set, tmp_path):
    rs = reference_set
    for name in rs.files:
        tree = ck.unflatten_params(dict(rs.arrays(name)))
        ck.save_params(tmp_path / name, tree)
        assert (tmp_path / name).read_bytes() == rs.path(name).read_bytes(), name


def test_save_reproduces_chunked_demo_bytes(reference_set, tmp_path):
    rs = reference_set
    tree = ck.unflatten_params(dict(rs.arrays(rs.demo_file)))
    ck.save_params(f"params::{tmp_path / 'out'}", tree,
                   chunk_threshold=rs.demo["max_chunk_size_bytes_used"])
    assert (tmp_path / "out").read_bytes() == rs.path(rs.demo_file).read_bytes()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 255, 256, 65535, 65536])
def test_headers_match_msgpack(n):
    assert params_writer._bin_header(n) + b"x" * n == msgpack.packb(b"x" * n, use_bin_type=True)
    assert params_writer._ext_header(1, n) + b"x" * n == msgpack.packb(msgpack.ExtType(1, b"x" * n))


@pytest.mark.parametrize("threshold", [params_file.MAX_CHUNK_SIZE, 8])
def test_round_trip_dtypes_and_chunking(tmp_path, threshold, monkeypatch):
    from flax import serialization

    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", threshold)
    tree = _small_tree(np.random.default_rng(0))
    ck.save_params(tmp_path / "p", tree, chunk_threshold=threshold)
    oracle = {k: serialization.msgpack_restore(v) for k, v in _raw_records(tmp_path / "p")}
    back = dict(ck.iter_params_file(tmp_path / "p"))
    want = dict(ck.flatten_params(tree))
    assert list(back) == list(want) == list(oracle)
    for key, value in want.items():
        for got in (back[key], oracle[key]):
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
        # byte for byte what flax writes
        assert _raw_records(tmp_path / "p")[list(want).index(key)][1] == \
            serialization.to_bytes(value)


def test_save_casts_floats_only(tmp_path):
    tree = _small_tree(np.random.default_rng(1))
    ck.save_params(tmp_path / "p", tree, float_dtype="bfloat16")
    back = dict(ck.iter_params_file(tmp_path / "p"))
    assert back[("a", "f32")].dtype == ml_dtypes.bfloat16
    assert back[("b", "f16")].dtype == ml_dtypes.bfloat16
    assert back[("b", "i32")].dtype == np.int32 and back[("b", "bool")].dtype == bool


# ----------------------------------------------------------------------------- errors


def _cut_offsets(path: Path) -> dict[str, int]:
    bounds = _record_bounds(path)
    second = bounds[0]
    return {
        "inside the first header": 5,
        "inside the second record's header": second + 12,
        "inside data": second // 2,
        "record boundary minus 1": bounds[1] - 1,
        "last byte missing": bounds[-1] - 1,
    }


def test_truncated_files_raise_clear_errors(reference_set, tmp_path):
    rs = reference_set
    for name in (rs.primary, rs.demo_file):
        src = rs.path(name)
        data = src.read_bytes()
        for where, cut in _cut_offsets(src).items():
            bad = tmp_path / f"{name}-cut{cut}"
            bad.write_bytes(data[:cut])
            with pytest.raises(ck.CheckpointError, match="truncated") as err:
                list(ck.iter_params_file(bad))
            msg = str(err.value)
            assert f"ends at byte {cut}" in msg, (name, where)
            assert "record #" in msg and str(bad) in msg, (name, where)


def test_truncated_message_names_the_key(reference_set, tmp_path):
    rs = reference_set
    src = rs.path(rs.primary)
    bounds = _record_bounds(src)
    # cut inside the second record's data (its data is at least its last 4 bytes)
    bad = tmp_path / "bad"
    bad.write_bytes(src.read_bytes()[:bounds[1] - 2])
    second_key = rs.files[rs.primary]["arrays"][1]["key"]
    with pytest.raises(ck.CheckpointError, match=f"record #1 \\(key {second_key}\\)"):
        list(ck.iter_params_file(bad))


def test_cut_at_record_boundary_is_missing_keys(reference_set, tmp_path):
    rs = reference_set
    for name, entry in rs.files.items():
        src = rs.path(name)
        bad = tmp_path / name
        bad.write_bytes(src.read_bytes()[:_record_bounds(src)[-2]])
        last = entry["arrays"][-1]["key"]
        with pytest.raises(ck.CheckpointError, match=f"missing 1 parameter.*{last}"):
            ck.load_params(bad, rs.config(), progress=False)


def _flip(data: bytes, offset: int, value: int | None = None) -> bytes:
    b = bytearray(data)
    b[offset] = (b[offset] ^ 0xFF) if value is None else value
    return bytes(b)


def test_corrupt_structure_raises_checkpoint_error(reference_set, tmp_path):
    rs = reference_set
    data = rs.path(rs.primary).read_bytes()
    at = _first_record_offsets(data)
    dtype_name = rs.files[rs.primary]["arrays"][0]["dtype"].encode()
    dtype_at = data.index(dtype_name)
    cases = {
        "not a record": (_flip(data, 0), "should start"),
        "key not strings": (_flip(data, 2, 0x01), "key"),
        "ext type": (_flip(data, at["ext_type_at"], 0x07), "ext type 7"),
        "dtype name": (data[:dtype_at] + b"x" * len(dtype_name) + data[dtype_at + len(dtype_name):],
                       "unknown dtype 'x+'"),
        "value length": (_flip(data, at["bin_len_at"], 0xFF), "truncated|declares"),
        "garbage": (np.random.default_rng(0).bytes(4096), "params|truncated|corrupt"),
    }
    for name, (bad, pattern) in cases.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(bad)
        with pytest.raises(ck.CheckpointError, match=pattern):
            list(ck.iter_params_file(path))


def test_random_byte_flips_only_raise_checkpoint_errors(tmp_path):
    """Any corruption either loads (data bytes) or raises CheckpointError, nothing else."""
    ck.save_params(tmp_path / "p", _small_tree(np.random.default_rng(2)), chunk_threshold=16)
    data = (tmp_path / "p").read_bytes()
    rng = np.random.default_rng(3)
    raised = 0
    for i in range(300):
        bad = bytearray(data)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
            bad[pos] = int(rng.integers(0, 256))
        path = tmp_path / "bad"
        path.write_bytes(bytes(bad))
        try:
            list(ck.iter_params_file(path))
        except ck.CheckpointError:
            raised += 1
    assert raised > 30  # structural bytes were hit and reported


def _write_raw_record(path: Path, key: list, shape: list, dtype: str, raw: bytes) -> None:
    inner = msgpack.packb([shape, dtype, raw], use_bin_type=True)
    value = msgpack.packb(msgpack.ExtType(1, inner))
    path.write_bytes(msgpack.packb([key, value], use_bin_type=True))


def test_unknown_dtype_and_length_mismatch(tmp_path):
    _write_raw_record(tmp_path / "a", ["x"], [2], "complex256", b"\0" * 64)
    with pytest.raises(ck.CheckpointError, match="unknown dtype 'complex256'.*key x"):
        list(ck.iter_params_file(tmp_path / "a"))
    _write_raw_record(tmp_path / "b", ["x", "y"], [3], "float32", b"\0" * 8)
    with pytest.raises(ck.CheckpointError, match=r"data length 8 .*\(3,\).*12 bytes.*key x/y"):
        list(ck.iter_params_file(tmp_path / "b"))


def _expected_error(entry: dict, want: dict) -> str:
    """What loading the file against the tree `want` must say: the first record (file
    order) whose shape differs, else the first parameter the file lacks."""
    have = {tuple(a["key"].split("/")): tuple(a["shape"]) for a in entry["arrays"]}
    for key, shape in have.items():
        if key in want and shape != want[key]:
            return re.escape(f"{'/'.join(key)} has shape {shape}, the config expects {want[key]}")
    missing = [k for k in want if k not in have]
    assert missing, "nothing differs: the changed config would load"
    return f"missing {len(missing)} parameter.*{re.escape('/'.join(missing[0]))}"


def test_wrong_shapes_vs_config_name_the_key(reference_set):
    rs = reference_set
    cfg = rs.config()
    changes = [dict(vocab_size=cfg.vocab_size + 7), dict(hidden_size=cfg.hidden_size * 2),
               dict(intermediate_size=cfg.intermediate_size + 1),
               dict(num_hidden_layers=cfg.num_hidden_layers + 1)]
    for name, entry in rs.files.items():
        for change in changes:
            wrong = cfg.replace(**change)
            message = _expected_error(
                entry, ck.expected_param_shapes(wrong, scan_layers=entry["scan_layers"]))
            with pytest.raises(ck.CheckpointError, match=message):
                ck.load_params(rs.path(name), wrong, progress=False)
    scanned = rs.fp32_file(True)
    flipped = cfg.replace(param_scan_axis=1 - rs.manifest["param_scan_axis"])
    if cfg.num_hidden_layers != cfg.hidden_size:  # otherwise the two axes look alike
        message = _expected_error(rs.files[scanned],
                                  ck.expected_param_shapes(flipped, scan_layers=True))
        assert "missing" not in message
        with pytest.raises(ck.CheckpointError, match=message):
            ck.load_params(rs.path(scanned), flipped, progress=False)
    with pytest.raises(ck.CheckpointError, match="unexpected parameter vision_head/kernel"):
        ck.load_params(rs.path(rs.primary), cfg.replace(tie_vision_embeddings=True), progress=False)


def test_specs_and_missing_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match="unsupported checkpoint spec 'trainstate'"):
        ck.load_params("trainstate::/x", progress=False)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_params(f"params::{tmp_path / 'nope'}", progress=False)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty"):
        ck.load_params(tmp_path / "empty", progress=False)


# ----------------------------------------------------------------------------- shapes


def test_expected_shapes_layouts(reference_set):
    cfg = reference_set.config()
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    scan0 = ck.expected_param_shapes(cfg.replace(param_scan_axis=0), scan_layers=True)
    scan1 = ck.expected_param_shapes(cfg.replace(param_scan_axis=1), scan_layers=True)
    per_layer = ck.expected_param_shapes(cfg, scan_layers=False)
    assert ck.expected_param_shapes(cfg) == (scan0 if cfg.scan_layers and not cfg.param_scan_axis
                                             else scan1 if cfg.scan_layers else per_layer)
    wq = ("transformer", "h", ck.SCAN_KEY, "attention", "wq", "kernel")
    assert scan0[wq] == (layers, h, h) and scan1[wq] == (h, layers, h)
    norm = ("transformer", "h", ck.SCAN_KEY, "ffn_norm", "kernel")
    assert scan0[norm] == (layers, h) and scan1[norm] == (h, layers)
    assert per_layer[("transformer", "h", str(layers - 1), "feed_forward", "w2", "kernel")] == \
        (cfg.intermediate_size, h)
    tied = ck.expected_param_shapes(cfg.replace(tie_word_embeddings=True,
                                                tie_vision_embeddings=True))
    assert ("lm_head", "kernel") not in tied and ("vision_head", "kernel") not in tied
    text = ck.expected_param_shapes(cfg.replace(vision_vocab_size=0))
    assert not any(k[-2] in ("vte", "vision_head") for k in text)
    kv = cfg.num_attention_heads // 2
    gqa = ck.expected_param_shapes(cfg.replace(num_key_value_heads=kv), scan_layers=False)
    assert gqa[("transformer", "h", "0", "attention", "wk", "kernel")] == (h, kv * cfg.head_dim)
    assert sum(int(np.prod(s)) for s in per_layer.values()) == cfg.num_params()
    # the manifest's files are exactly the expected trees of their layouts
    for name, entry in reference_set.files.items():
        assert {tuple(a["key"].split("/")): tuple(a["shape"]) for a in entry["arrays"]} == \
            ck.expected_param_shapes(cfg, scan_layers=entry["scan_layers"]), name


# ----------------------------------------------------------------------------- placement


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tp"))


def _spec_for(path: tuple, shape: tuple, mesh: Mesh) -> NamedSharding:
    # shard the last axis over tp when it divides, the first over fsdp: enough variety
    spec = [None] * len(shape)
    if shape and shape[-1] % 4 == 0:
        spec[-1] = "tp"
    if len(shape) > 1 and shape[0] % 2 == 0:
        spec[0] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def test_sharded_loading_callable(reference_set, mesh):
    rs = reference_set
    for name in (rs.fp32_file(True), rs.fp32_file(False)):
        shapes = ck.expected_param_shapes(rs.config(), scan_layers=rs.files[name]["scan_layers"])
        calls = []

        def shardings(path):
            calls.append(path)
            return _spec_for(path, shapes[path], mesh)

        params = ck.load_params(rs.path(name), rs.config(), dtype="bfloat16",
                                shardings=shardings, progress=False)
        ref = rs.arrays(name)
        assert calls == list(ref)  # one placement per tensor, in file order
        for path, value in ck.flatten_params(params):
            assert value.sharding == _spec_for(path, shapes[path], mesh)
            assert len(value.sharding.device_set) == 8
            assert value.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(np.asarray(value), ref[path].astype(ml_dtypes.bfloat16))


def test_sharded_loading_pytree(reference_set, mesh):
    rs = reference_set
    tree = {}
    for r in rs.demo["records_in_file_order"]:
        node = tree
        *parents, leaf = r["key"].split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _spec_for(tuple(r["key"].split("/")), tuple(r["shape"]), mesh)
    params = ck.load_params(rs.path(rs.demo_file), shardings=tree, progress=False)
    for path, value in ck.flatten_params(params):
        want = tree
        for p in path:
            want = want[p]
        assert value.sharding == want
    first = rs.demo["records_in_file_order"][0]["key"].split("/")
    node = tree
    for p in first[:-1]:
        node = node[p]
    del node[first[-1]]
    with pytest.raises(ck.CheckpointError, match=f"no sharding given for parameter {'/'.join(first)}"):
        ck.load_params(rs.path(rs.demo_file), shardings=tree, progress=False)


def test_progress_is_logged(reference_set, caplog):
    rs = reference_set
    with caplog.at_level(logging.INFO, logger="lwm_serve.model.checkpoint"):
        ck.load_params(rs.path(rs.demo_file), progress=True)
    lines = [r.getMessage() for r in caplog.records if "%" in r.getMessage()]
    assert lines and lines[-1].startswith(f"loading {rs.demo_file}: 100%")


# ----------------------------------------------------------------------------- Hugging Face


def _hf_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, vision_vocab_size=0, scan_layers=False, theta=10000.0)
    return ModelConfig(**{**base, **kw})


def _random_tree(cfg: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return ck.unflatten_params({p: rng.standard_normal(s).astype(np.float32)
                                for p, s in ck.expected_param_shapes(cfg).items()})


def _rope_interleaved(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """LWM/Meta RoPE: rotate pairs (2i, 2i+1) by pos * theta**(-2i/d). x: [heads, d]."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    c = x[..., 0::2] * np.cos(ang) - x[..., 1::2] * np.sin(ang)
    s = x[..., 0::2] * np.sin(ang) + x[..., 1::2] * np.cos(ang)
    return np.stack([c, s], axis=-1).reshape(x.shape)


def _rope_rotate_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """HF LLaMA RoPE: x * cos + rotate_half(x) * sin, halves (i, i + d/2). x: [heads, d]."""
    d = x.shape[-1]
    ang = np.tile(pos * theta ** (-np.arange(0, d, 2) / d), 2)
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * np.cos(ang) + rotated * np.sin(ang)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_hf_rope_layout_is_unpermuted(tmp_path, kv_heads):
    """HF q/k rows are permuted for rotate_half; after loading, interleaved RoPE on our
    kernels must give the same attention scores as HF's RoPE on HF's weights."""
    from safetensors.numpy import save_file

    cfg = _hf_cfg(num_key_value_heads=kv_heads)
    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.kv_heads
    rng = np.random.default_rng(4)
    hf = {ck.path_to_hf_name(p): rng.standard_normal(s[::-1] if p[-1] == "kernel" and len(s) == 2
                                                    else s).astype(np.float32)
          for p, s in ck.expected_param_shapes(cfg).items()}
    save_file(hf, str(tmp_path / "model.safetensors"))
    ours = ck.load_hf_llama(tmp_path, cfg, progress=False)
    layer = ours["transformer"]["h"]["0"]["attention"]
    wq, wk = np.asarray(layer["wq"]["kernel"]), np.asarray(layer["wk"]["kernel"])
    x_q, x_k = rng.standard_normal(h), rng.standard_normal(h)
    q_pos, k_pos, group = 7, 3, nh // nkv

    def scores(q, k, rope):
        q = rope(q.reshape(nh, hd), q_pos, cfg.theta)
        k = rope(k.reshape(nkv, hd), k_pos, cfg.theta)
        return np.einsum("hd,hd->h", q, np.repeat(k, group, axis=0))

    hf_q = hf["model.layers.0.self_attn.q_proj.weight"]
    hf_k = hf["model.layers.0.self_attn.k_proj.weight"]
    want = scores(hf_q @ x_q, hf_k @ x_k, _rope_rotate_half)
    got = scores(x_q @ wq, x_k @ wk, _rope_interleaved)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # q itself equals HF's q up to the per-head row permutation
    np.testing.assert_allclose(
        ck.permute_rope(_rope_interleaved((x_q @ wq).reshape(nh, hd), q_pos, cfg.theta)
                        .reshape(-1, 1), nh)[:, 0],
        _rope_rotate_half((hf_q @ x_q).reshape(nh, hd), q_pos, cfg.theta).reshape(-1),
        rtol=1e-5, atol=1e-5)
    # and a plain transpose (no un-permute) would have been wrong
    naive = scores(x_q @ hf_q.T, x_k @ hf_k.T, _rope_interleaved)
    assert not np.allclose(naive, want, rtol=1e-3)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_hf_round_trip(tmp_path, num_shards, mesh):
    from lwm_serve.model.config import from_hf_json

    cfg = _hf_cfg(num_key_value_heads=2)
    tree = _random_tree(cfg, 5)
    ck.save_hf_llama(tmp_path, tree, cfg, num_shards=num_shards)
    if num_shards > 1:
        index = json.loads((tmp_path / ck.HF_INDEX).read_text())
        assert len(set(index["weight_map"].values())) == 2
        assert not (tmp_path / ck.HF_SINGLE).exists()
    loaded_cfg = from_hf_json(tmp_path / "config.json")
    assert ck.expected_param_shapes(loaded_cfg) == ck.expected_param_shapes(cfg)
    sharding = NamedSharding(mesh, P())
    back = ck.load_hf_llama(tmp_path, loaded_cfg, shardings=sharding, progress=False)
    flat_back = dict(ck.flatten_params(back))
    assert list(flat_back) == list(ck.expected_param_shapes(cfg))
    for path, value in ck.flatten_params(tree):
        assert flat_back[path].sharding == sharding
        np.testing.assert_array_equal(np.asarray(flat_back[path]), value)
    # load_checkpoint dispatches a directory to the HF loader
    again = ck.load_checkpoint(tmp_path, loaded_cfg, progress=False)
    np.testing.assert_array_equal(np.asarray(again["lm_head"]["kernel"]),
                                  tree["lm_head"]["kernel"])


def test_hf_errors(tmp_path):
    from safetensors.numpy import save_file

    cfg = _hf_cfg()
    with pytest.raises(ck.CheckpointError, match="no model.safetensors"):
        ck.load_hf_llama(tmp_path, cfg, progress=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="only safetensors"):
        ck.load_hf_llama(tmp_path, cfg, progress=False)
    with pytest.raises(ck.CheckpointError, match="scan_layers=False"):
        ck.load_hf_llama(tmp_path, cfg.replace(scan_layers=True), progress=False)
    with pytest.raises(ck.CheckpointError, match="vision_vocab_size=0"):
        ck.load_hf_llama(tmp_path, cfg.replace(vision_vocab_size=16), progress=False)
    ck.save_hf_llama(tmp_path, _random_tree(cfg, 6), cfg)
    with pytest.raises(ck.CheckpointError, match=r"lm_head/kernel has shape \(32, 48\), "
                                                 r"the config expects \(32, 50\)"):
        ck.load_hf_llama(tmp_path, cfg.replace(vocab_size=50), progress=False)
    save_file({"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ck.CheckpointError, match="unexpected tensor 'model.layers.0.self_attn"):
        ck.load_hf_llama(tmp_path, cfg, progress=False)


# ----------------------------------------------------------------------------- pickles


def test_vqgan_pickle_loads_like_pickle(reference_dir):
    path = reference_dir / "vqgan" / "vqgan_params.pkl"
    ours = load_pickle_params(path)
    with open(path, "rb") as f:
        plain = pickle.load(f)
    a, b = dict(ck.flatten_params(ours)), dict(ck.flatten_params(plain))
    assert list(a) == list(b) and a
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_array_pickles_every_protocol(protocol):
    tree = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]},
            "s": [np.float32(1.5), np.int64(3)]}
    back = loads_pickle_params(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(back["a"]["w"], tree["a"]["w"])
    assert back["s"] == tree["s"]


class _Hostile:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_hostile_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "os.system": _Hostile(os.system, f"touch {marker}"),
        "builtins.eval": _Hostile(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Hostile(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": _Hostile(exec, f"open({str(marker)!r}, 'w').close()"),
    }
    for name, payload in cases.items():
        data = pickle.dumps({"params": {"w": np.ones(2, np.float32), "x": payload}})
        func = payload.func
        refused = f"{func.__module__}.{func.__qualname__}"
        path = tmp_path / "evil.pkl"
        path.write_bytes(data)
        with pytest.raises(ck.CheckpointError, match=f"refusing to unpickle global {refused}"):
            load_pickle_params(path)
        assert not marker.exists(), name
    # the payloads were live: plain pickle would have run them
    pickle.loads(pickle.dumps(cases["builtins.eval"]))
    assert marker.exists()


def test_corrupt_and_odd_pickles(tmp_path):
    data = pickle.dumps({"w": np.ones(3, np.float32)})
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
        loads_pickle_params(data[:-5])
    with pytest.raises(ck.CheckpointError, match="object array"):
        loads_pickle_params(pickle.dumps({"w": np.array([1, "a"], dtype=object)}))
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([np.ones(1)]))
    with pytest.raises(ck.CheckpointError, match="expected a dict"):
        load_pickle_params(tmp_path / "list.pkl")
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        load_pickle_params(tmp_path / "missing.pkl")
