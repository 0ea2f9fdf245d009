"""Checkpoint loading: layouts, shapes against the config, shard-on-load, progress.

Every fixture test takes `reference_set` (tests/model/conftest.py): the public set and
a generated one of other sizes and layouts. Facts come from each set's config.json and
manifest.json (each file's own layout and dtype), never from the public set's values.
"""

import logging
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lwm_serve.model import checkpoint as ck
from lwm_serve.model import params as params_lib


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
