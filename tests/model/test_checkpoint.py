"""Checkpoint I/O: the reference's params:: files, HF LLaMA safetensors, pickles."""

import json
import logging
import os
import pickle
import subprocess
from pathlib import Path

import jax
import ml_dtypes
import msgpack
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lwm_serve.model import checkpoint as ck
from lwm_serve.model import params_file, params_writer
from lwm_serve.model.config import ModelConfig, from_reference_json
from lwm_serve.model.unpickle import load_pickle_params, loads_pickle_params


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir(reference_dir: Path) -> Path:
    return reference_dir / "model"


@pytest.fixture(scope="module")
def manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def demo(model_dir: Path) -> dict:
    return json.loads((model_dir / "params_chunked_demo.json").read_text())


@pytest.fixture(scope="module")
def cfg(model_dir: Path) -> ModelConfig:
    return from_reference_json(model_dir / "config.json")


@pytest.fixture(scope="module")
def scan_arrays(model_dir: Path, manifest: dict) -> dict:
    name = next(n for n, f in manifest["files"].items()
                if f["scan_layers"] and f["float_dtype"] == "fp32")
    return {"/".join(k): v for k, v in ck.iter_params_file(model_dir / name)}


# Parametrize ids need the names at collection time, before fixtures exist.
_MANIFEST = Path(__file__).parents[1] / "fixtures" / "lwm_reference" / "model" / "manifest.json"
FIXTURE_NAMES = list(json.loads(_MANIFEST.read_text())["files"])


def _file_cfg(cfg: ModelConfig, entry: dict) -> ModelConfig:
    return cfg.replace(scan_layers=entry["scan_layers"])


def _record_bounds(path: Path) -> list[int]:
    """Record end offsets, found with msgpack's own Unpacker (independent of ours)."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, max_buffer_size=2**31 - 1)
        bounds = []
        for _ in unpacker:
            bounds.append(unpacker.tell())
    return bounds


def _decode_with_msgpack(value: bytes) -> np.ndarray:
    """flax from_bytes of one record value, re-implemented with msgpack (test oracle)."""
    def hook(code: int, data: bytes) -> np.ndarray:
        assert code == 1
        shape, dtype, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
    obj = msgpack.unpackb(value, ext_hook=hook, raw=False, strict_map_key=False)
    if isinstance(obj, dict):
        shape = [obj["shape"][str(i)] for i in range(len(obj["shape"]))]
        chunks = [obj["chunks"][str(i)] for i in range(len(obj["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return obj


def _small_tree(rng: np.random.Generator) -> dict:
    return {
        "a": {"f32": rng.standard_normal((3, 5)).astype(np.float32),
              "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)},
        "b": {"i32": np.arange(7, dtype=np.int32), "f16": np.ones((2, 2), np.float16),
              "bool": np.array([True, False]), "scalar": np.array(2.5, np.float32),
              "empty": np.zeros((0, 3), np.float32)},
    }


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_file_matches_manifest(model_dir, manifest, name):
    entry = manifest["files"][name]
    got = [("/".join(k), list(v.shape), v.dtype.name) for k, v in
           ck.iter_params_file(model_dir / name)]
    want = [(a["key"], a["shape"], a["dtype"]) for a in entry["arrays"]]
    assert got == want
    assert (model_dir / name).stat().st_size == entry["bytes"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reader_agrees_with_msgpack_oracle(model_dir, name):
    with open(model_dir / name, "rb") as f:
        oracle = {tuple(k): _decode_with_msgpack(v) for k, v in msgpack.Unpacker(f)}
    ours = dict(ck.iter_params_file(model_dir / name))
    assert list(ours) == list(oracle)
    for key, value in ours.items():
        assert value.dtype == oracle[key].dtype
        np.testing.assert_array_equal(value, oracle[key])


def test_scan_and_noscan_hold_the_same_weights(model_dir, manifest, cfg):
    files = manifest["files"]
    scan = next(n for n, f in files.items() if f["scan_layers"] and f["float_dtype"] == "fp32")
    noscan = next(n for n, f in files.items() if not f["scan_layers"])
    a = dict(ck.iter_params_file(model_dir / scan))
    b = dict(ck.iter_params_file(model_dir / noscan))
    axis = manifest["param_scan_axis"]
    for key, value in a.items():
        if key[:3] == ("transformer", "h", ck.SCAN_KEY):
            layers = [b[("transformer", "h", str(i), *key[3:])]
                      for i in range(cfg.num_hidden_layers)]
            np.testing.assert_array_equal(value, np.stack(layers, axis=axis))
        else:
            np.testing.assert_array_equal(value, b[key])
    n_layer_keys = sum(k[2] == ck.SCAN_KEY for k in a if k[:2] == ("transformer", "h"))
    assert len(b) == len(a) - n_layer_keys + n_layer_keys * cfg.num_hidden_layers


def test_bf16_file_is_scan_rounded_to_bf16(model_dir, manifest, cfg, scan_arrays):
    name = next(n for n, f in manifest["files"].items() if f["float_dtype"] == "bf16")
    params = ck.load_params(f"params::{model_dir / name}", _file_cfg(cfg, manifest["files"][name]),
                            dtype="float32", progress=False)
    flat = dict(ck.flatten_params(params))
    assert len(flat) == len(scan_arrays)
    for key, value in flat.items():
        assert value.dtype == np.float32
        want = scan_arrays["/".join(key)].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(value), want)


def test_bf16_file_loads_as_bf16_without_cast(model_dir, manifest):
    name = next(n for n, f in manifest["files"].items() if f["float_dtype"] == "bf16")
    params = ck.load_params(model_dir / name, progress=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_chunked_demo_reads_its_sources(model_dir, demo, scan_arrays):
    got = dict(ck.iter_params_file(model_dir / "params_chunked_demo"))
    assert ["/".join(k) for k in got] == [r["key"] for r in demo["records_in_file_order"]]
    with open(model_dir / "params_chunked_demo", "rb") as f:
        raw = {"/".join(k): msgpack.unpackb(v, raw=False, strict_map_key=False,
                                           ext_hook=lambda c, d: None)
               for k, v in msgpack.Unpacker(f)}
    for record in demo["records_in_file_order"]:
        value = got[tuple(record["key"].split("/"))]
        assert list(value.shape) == record["shape"] and value.dtype.name == record["dtype"]
        want = scan_arrays[record["key"]].astype(record["dtype"])
        np.testing.assert_array_equal(value, want)
        # the file really uses the chunked form where the json says so
        assert isinstance(raw[record["key"]], dict) == record["chunked"]
        if record["chunked"]:
            assert len(raw[record["key"]]["chunks"]) == record["n_chunks"]


def test_load_params_validates_and_returns_tree(model_dir, manifest, cfg):
    for name, entry in manifest["files"].items():
        params = ck.load_params(model_dir / name, _file_cfg(cfg, entry), progress=False)
        flat = dict(ck.flatten_params(params))
        assert {k: tuple(v.shape) for k, v in flat.items()} == \
            ck.expected_param_shapes(_file_cfg(cfg, entry))
        assert all(isinstance(v, jax.Array) for v in flat.values())


def test_iteration_is_streaming(model_dir, tmp_path):
    src = model_dir / "params_chunked_demo"
    first_end = _record_bounds(src)[0]
    bad = tmp_path / "bad"
    bad.write_bytes(src.read_bytes()[:first_end] + b"\xc1" * 64)
    records = ck.iter_params_file(bad)
    key, _ = next(records)  # the first record is returned before the rest is read
    assert key == ("lm_head", "kernel")
    with pytest.raises(ck.CheckpointError, match=r"record #1 .*byte %d" % first_end):
        next(records)


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_save_reproduces_fixture_bytes(model_dir, name, tmp_path):
    tree = ck.unflatten_params(dict(ck.iter_params_file(model_dir / name)))
    ck.save_params(tmp_path / "out", tree)
    assert (tmp_path / "out").read_bytes() == (model_dir / name).read_bytes()


def test_save_reproduces_chunked_demo_bytes(model_dir, demo, tmp_path):
    tree = ck.unflatten_params(dict(ck.iter_params_file(model_dir / "params_chunked_demo")))
    ck.save_params(f"params::{tmp_path / 'out'}", tree,
                   chunk_threshold=demo["max_chunk_size_bytes_used"])
    assert (tmp_path / "out").read_bytes() == (model_dir / "params_chunked_demo").read_bytes()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 255, 256, 65535, 65536])
def test_headers_match_msgpack(n):
    assert params_writer._bin_header(n) + b"x" * n == msgpack.packb(b"x" * n, use_bin_type=True)
    assert params_writer._ext_header(1, n) + b"x" * n == msgpack.packb(msgpack.ExtType(1, b"x" * n))


@pytest.mark.parametrize("threshold", [params_file.MAX_CHUNK_SIZE, 8])
def test_round_trip_dtypes_and_chunking(tmp_path, threshold):
    tree = _small_tree(np.random.default_rng(0))
    ck.save_params(tmp_path / "p", tree, chunk_threshold=threshold)
    with open(tmp_path / "p", "rb") as f:
        oracle = {tuple(k): _decode_with_msgpack(v) for k, v in msgpack.Unpacker(f)}
    back = dict(ck.iter_params_file(tmp_path / "p"))
    want = dict(ck.flatten_params(tree))
    assert list(back) == list(want) == list(oracle)
    for key, value in want.items():
        for got in (back[key], oracle[key]):
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)


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


@pytest.mark.parametrize("name", ["params_scan", "params_chunked_demo"])
def test_truncated_files_raise_clear_errors(model_dir, tmp_path, name):
    src = model_dir / name
    data = src.read_bytes()
    for where, cut in _cut_offsets(src).items():
        bad = tmp_path / f"cut{cut}"
        bad.write_bytes(data[:cut])
        with pytest.raises(ck.CheckpointError, match="truncated") as err:
            list(ck.iter_params_file(bad))
        msg = str(err.value)
        assert f"ends at byte {cut}" in msg, where
        assert "record #" in msg and str(bad) in msg, where


def test_truncated_message_names_the_key(model_dir, tmp_path):
    src = model_dir / "params_scan"
    bounds = _record_bounds(src)
    bad = tmp_path / "bad"
    bad.write_bytes(src.read_bytes()[:bounds[1] - 100])
    second_key = "/".join(list(ck.iter_params_file(src))[1][0])
    with pytest.raises(ck.CheckpointError, match=f"record #1 \\(key {second_key}\\)"):
        list(ck.iter_params_file(bad))


def test_cut_at_record_boundary_is_missing_keys(model_dir, cfg, tmp_path):
    src = model_dir / "params_scan"
    bad = tmp_path / "bad"
    bad.write_bytes(src.read_bytes()[:_record_bounds(src)[-2]])
    with pytest.raises(ck.CheckpointError, match="missing 1 parameter.*vision_head/kernel"):
        ck.load_params(bad, cfg, progress=False)


def _flip(data: bytes, offset: int, value: int | None = None) -> bytes:
    b = bytearray(data)
    b[offset] = (b[offset] ^ 0xFF) if value is None else value
    return bytes(b)


def test_corrupt_structure_raises_checkpoint_error(model_dir, tmp_path):
    data = (model_dir / "params_scan").read_bytes()
    ext_type_at = data.index(b"\xc9") + 5  # the first record's ext type byte
    dtype_at = data.index(b"float32")
    cases = {
        "not a record": (_flip(data, 0), "should start"),
        "key not strings": (_flip(data, 2, 0x01), "key"),
        "ext type": (_flip(data, ext_type_at, 0x07), "ext type 7"),
        "dtype name": (data[:dtype_at] + b"floax32" + data[dtype_at + 7:], "unknown dtype 'floax32'"),
        "value length": (_flip(data, 0x12, 0xFF), "truncated|declares"),
        "garbage": (np.random.default_rng(0).bytes(4096), "params|truncated|corrupt"),
    }
    for name, (bad, pattern) in cases.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(bad)
        with pytest.raises(ck.CheckpointError, match=pattern):
            list(ck.iter_params_file(path))


def test_random_byte_flips_only_raise_checkpoint_errors(tmp_path, cfg):
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


def test_wrong_shapes_vs_config_name_the_key(model_dir, cfg):
    path = model_dir / "params_scan"
    with pytest.raises(ck.CheckpointError, match=r"lm_head/kernel has shape \(64, 768\), "
                                                 r"the config expects \(64, 700\)"):
        ck.load_params(path, cfg.replace(vocab_size=700), progress=False)
    with pytest.raises(ck.CheckpointError, match=r"scan_decoder/attention/wk/kernel has shape "
                                                 r"\(2, 64, 64\), the config expects \(64, 2, 64\)"):
        ck.load_params(path, cfg.replace(param_scan_axis=1), progress=False)
    with pytest.raises(ck.CheckpointError, match="unexpected parameter vision_head/kernel"):
        ck.load_params(path, cfg.replace(tie_vision_embeddings=True), progress=False)


def test_specs_and_missing_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match="unsupported checkpoint spec 'trainstate'"):
        ck.load_params("trainstate::/x", progress=False)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_params(f"params::{tmp_path / 'nope'}", progress=False)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty"):
        ck.load_params(tmp_path / "empty", progress=False)


# ----------------------------------------------------------------------------- shapes


def test_expected_shapes_layouts(cfg):
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    scan0 = ck.expected_param_shapes(cfg)
    scan1 = ck.expected_param_shapes(cfg.replace(param_scan_axis=1))
    per_layer = ck.expected_param_shapes(cfg.replace(scan_layers=False))
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
    gqa = ck.expected_param_shapes(cfg.replace(num_key_value_heads=2, scan_layers=False))
    assert gqa[("transformer", "h", "0", "attention", "wk", "kernel")] == (h, 2 * cfg.head_dim)
    assert sum(int(np.prod(s)) for s in per_layer.values()) == cfg.num_params()


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


def test_sharded_loading_callable(model_dir, cfg, mesh):
    shapes = ck.expected_param_shapes(cfg)
    calls = []

    def shardings(path):
        calls.append(path)
        return _spec_for(path, shapes[path], mesh)

    params = ck.load_params(model_dir / "params_scan", cfg, dtype="bfloat16",
                            shardings=shardings, progress=False)
    ref = dict(ck.iter_params_file(model_dir / "params_scan"))
    assert calls == list(ref)  # one placement per tensor, in file order
    for path, value in ck.flatten_params(params):
        assert value.sharding == _spec_for(path, shapes[path], mesh)
        assert len(value.sharding.device_set) == 8
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(value), ref[path].astype(ml_dtypes.bfloat16))


def test_sharded_loading_pytree(model_dir, demo, mesh):
    tree = {}
    for r in demo["records_in_file_order"]:
        node = tree
        *parents, leaf = r["key"].split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _spec_for(tuple(r["key"].split("/")), tuple(r["shape"]), mesh)
    params = ck.load_params(model_dir / "params_chunked_demo", shardings=tree, progress=False)
    for path, value in ck.flatten_params(params):
        want = tree
        for p in path:
            want = want[p]
        assert value.sharding == want
    del tree["lm_head"]
    with pytest.raises(ck.CheckpointError, match="no sharding given for parameter lm_head"):
        ck.load_params(model_dir / "params_chunked_demo", shardings=tree, progress=False)


def test_progress_is_logged(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="lwm_serve.model.checkpoint"):
        ck.load_params(model_dir / "params_chunked_demo", progress=True)
    lines = [r.getMessage() for r in caplog.records if "%" in r.getMessage()]
    assert lines and lines[-1].startswith("loading params_chunked_demo: 100%")


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
