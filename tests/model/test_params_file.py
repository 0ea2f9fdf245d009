"""The params:: file format: reader and writer against flax.serialization, on every
reference set (tests/model/conftest.py), and every kind of corruption.

Facts come from each set's config.json and manifest.json (each file's own layout and
dtype), never from the public set's values. flax.serialization, the library that
defines the record values, is the oracle (a test-only dependency).
"""

import subprocess
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import pytest

from lwm_serve.model import checkpoint as ck
from lwm_serve.model import params_file, params_writer


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


def test_flax_is_never_imported_at_run_time():
    """flax is a test-only oracle: serving and loading must not need it."""
    import sys

    code = ("import sys, lwm_serve.server.cli, lwm_serve.server.runtime, "
            "lwm_serve.model.checkpoint, lwm_serve.model.generation, lwm_serve.tokenizers.vqgan; "
            "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if 'flax' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_save_casts_floats_only(tmp_path):
    tree = _small_tree(np.random.default_rng(1))
    ck.save_params(tmp_path / "p", tree, float_dtype="bfloat16")
    back = dict(ck.iter_params_file(tmp_path / "p"))
    assert back[("a", "f32")].dtype == ml_dtypes.bfloat16
    assert back[("b", "f16")].dtype == ml_dtypes.bfloat16
    assert back[("b", "i32")].dtype == np.int32 and back[("b", "bool")].dtype == bool


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
