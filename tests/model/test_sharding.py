"""Partition rules (against the reference's), activation/cache placement, checks."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from lwm_serve.model import params as params_lib
from lwm_serve.model import sharding
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.mesh import make_mesh

FS = ("fsdp", "sp")


def _reference_rules(scan_layers: bool, scan_axis: int):
    """LWM's VideoLLaMAConfig.get_partition_rules, restated (first match wins)."""
    if not scan_layers:
        layer = [("attention/(wq|wk|wv)/kernel", PS(FS, "tp")), ("attention/wo/kernel", PS("tp", FS)),
                 ("feed_forward/w1/kernel", PS(FS, "tp")), ("feed_forward/w2/kernel", PS("tp", FS)),
                 ("feed_forward/w3/kernel", PS(FS, "tp")), ("attention_norm/kernel", PS(None)),
                 ("ffn_norm/kernel", PS(None))]
    elif scan_axis == 0:
        layer = [("attention/(wq|wk|wv)/kernel", PS(None, FS, "tp")),
                 ("attention/wo/kernel", PS(None, "tp", FS)),
                 ("feed_forward/w1/kernel", PS(None, FS, "tp")), ("feed_forward/w2/kernel", PS(None, "tp", FS)),
                 ("feed_forward/w3/kernel", PS(None, FS, "tp")), ("attention_norm/kernel", PS(None, None)),
                 ("ffn_norm/kernel", PS(None, None))]
    else:
        layer = [("attention/(wq|wk|wv)/kernel", PS(FS, None, "tp")),
                 ("attention/wo/kernel", PS("tp", None, FS)),
                 ("feed_forward/w1/kernel", PS(FS, None, "tp")), ("feed_forward/w2/kernel", PS("tp", None, FS)),
                 ("feed_forward/w3/kernel", PS(FS, None, "tp")), ("attention_norm/kernel", PS(None, None)),
                 ("ffn_norm/kernel", PS(None, None))]
    return ([("transformer/wte/embedding", PS("tp", FS)), ("transformer/vte/embedding", PS("tp", FS))]
            + layer + [("transformer/ln_f/kernel", PS(None)), ("lm_head/kernel", PS(FS, "tp")),
                       ("vision_head/kernel", PS(FS, "tp")), (".*", PS(None))])


def _norm(spec: PS, ndim: int) -> tuple:
    entries = list(spec) + [None] * (ndim - len(spec))
    return tuple(tuple(e) if isinstance(e, (tuple, list)) and len(e) > 1
                 else (e[0] if isinstance(e, (tuple, list)) else e) for e in entries)


@pytest.mark.parametrize("scan_layers, scan_axis", [(True, 0), (True, 1), (False, 0)])
def test_param_specs_equal_reference_rules(scan_layers, scan_axis):
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, vision_vocab_size=64, scan_layers=scan_layers,
                      param_scan_axis=scan_axis)
    mesh = make_mesh("1,2,2,2")
    ours = sharding.param_specs(cfg, mesh)
    rules = _reference_rules(scan_layers, scan_axis)
    shapes = params_lib.param_shapes(cfg)
    assert set(ours) == set(shapes)
    for path, shape in shapes.items():
        name = "/".join(path)
        want = next(spec for pattern, spec in rules if re.search(pattern, name))
        assert _norm(ours[path], len(shape)) == _norm(want, len(shape)), name


@pytest.mark.parametrize("scan_layers", [True, False])
def test_param_shardings_callable_places_shards(scan_layers):
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, vision_vocab_size=32, scan_layers=scan_layers)
    mesh = make_mesh("1,2,2,2")
    sharding_of = sharding.param_shardings(cfg, mesh)
    assert sharding_of(("params", "lm_head", "kernel")) == sharding_of(("lm_head", "kernel"))
    params = params_lib.init_params(cfg, jax.random.PRNGKey(0))
    placed = sharding.shard_params(params, cfg, mesh)
    layer = (placed["transformer"]["h"]["scan_decoder"] if scan_layers
             else placed["transformer"]["h"]["0"])
    wq = layer["attention"]["wq"]["kernel"]
    *layers, h, nd = wq.shape
    assert {s.data.shape for s in wq.addressable_shards} == {(*layers, h // 4, nd // 2)}
    # a checkpoint in the other layout is placed too (the loader accepts either)
    other, _ = params_lib.unstack_layers(params, cfg) if scan_layers else (None, None)
    for path in params_lib.param_infos(cfg, scan_layers=not scan_layers):
        assert sharding_of(path).spec == sharding.spec_for(
            sharding.param_logical_axes(cfg, path), params_lib.param_info(cfg, path).shape, mesh)
    if other is not None:
        assert sharding.shard_params(other, cfg, mesh)["transformer"]["h"]["2"]
    with pytest.raises(sharding.ShardingError, match="no sharding rule"):
        sharding_of(("transformer", "nope"))


def test_validate_names_every_parameter_that_does_not_divide():
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, vision_vocab_size=32)  # 172 = 4 * 43
    with pytest.raises(sharding.ShardingError, match=r"feed_forward/w1/kernel.*not divisible"):
        sharding.validate(cfg, make_mesh("1,1,8,1"))


@pytest.mark.parametrize("scan_layers, scan_axis", [(True, 0), (True, 1), (False, 0)])
def test_one_declaration_gives_shapes_axes_and_abstract_tree(scan_layers, scan_axis):
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, vision_vocab_size=32, scan_layers=scan_layers,
                      param_scan_axis=scan_axis)
    infos = params_lib.param_infos(cfg)
    assert {p: i.shape for p, i in infos.items()} == params_lib.param_shapes(cfg)
    for path, info in infos.items():
        assert len(info.axes) == len(info.shape)
        assert sharding.param_logical_axes(cfg, path) == info.axes
        assert (sharding.LAYERS in info.axes) == (path[2:3] == (params_lib.SCAN_KEY,))
        if sharding.LAYERS in info.axes:
            assert info.axes.index(sharding.LAYERS) == scan_axis
            assert info.shape[scan_axis] == cfg.num_hidden_layers
    abstract = params_lib.abstract_params(cfg)
    real = params_lib.init_params(cfg, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(real)
    for a, r in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(real)):
        assert a.shape == r.shape and a.dtype == r.dtype


def test_batch_sharding_for_data_parallel_work():
    mesh = sharding.batch_mesh(jax.devices()[:8])
    x = jax.device_put(np.arange(16.0).reshape(8, 2), sharding.batch_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(1, 2)}
    w = jax.device_put(np.ones(3), sharding.replicated(mesh))
    assert {s.data.shape for s in w.addressable_shards} == {(3,)}


def test_only_sharding_names_mesh_axes():
    """A mesh axis name is a string constant in code of model/sharding.py alone."""
    import ast
    from pathlib import Path

    root = Path(sharding.__file__).resolve().parents[1]
    offenders = []
    for folder in ("model", "tokenizers", "server"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "sharding.py" and path.parent.name == "model":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in sharding.MESH_AXES:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_spec_for_drops_axes_that_do_not_divide_and_rejects_clashes():
    mesh = make_mesh("2,1,1,4")
    assert sharding.spec_for(sharding.TOKENS, (2, 8), mesh) == PS(("dp", "fsdp"), "sp")
    assert sharding.spec_for(sharding.TOKENS, (1, 8), mesh) == PS(None, "sp")
    assert sharding.spec_for(sharding.TOKENS, (2, 1), mesh) == PS(("dp", "fsdp"))
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.spec_for(sharding.TOKENS, (1, 8), mesh, strict=True)
    with pytest.raises(sharding.ShardingError, match="used by two dimensions"):
        sharding.spec_for((sharding.LENGTH, sharding.CACHE_LENGTH), (8, 8), mesh)


def test_constrain_is_a_noop_without_a_mesh_and_shards_with_one():
    x = jnp.ones((2, 8, 4))
    assert sharding.constrain(x, sharding.ACTIVATION) is x
    mesh = make_mesh("2,1,1,4")

    def f(x):
        with sharding.use_mesh(mesh):
            return sharding.constrain(x * 2, sharding.ACTIVATION)

    y = jax.jit(f)(x)
    assert {s.data.shape for s in y.addressable_shards} == {(1, 2, 4)}
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((2, 8, 4)))


@pytest.mark.parametrize("spec", ["1,1,2,4", "2,1,1,4", "1,2,2,2"])
def test_sharded_cache_is_split_over_batch_sequence_heads(spec):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, vision_vocab_size=0)
    mesh = make_mesh(spec)
    cache = sharding.init_sharded_cache(cfg, 2, 30, mesh)  # 30 -> rounded up to a multiple of sp
    sp, tp, bsplit = mesh.shape["sp"], mesh.shape["tp"], mesh.shape["dp"] * mesh.shape["fsdp"]
    assert cache.max_length % sp == 0 and cache.max_length >= 30
    want = (2 // bsplit, 4 // tp, cache.max_length // sp, cfg.head_dim)
    assert len(cache.k) == cfg.num_hidden_layers
    assert all({s.data.shape for s in layer.addressable_shards} == {want} for layer in cache.k)
    assert {s.data.shape for s in cache.valid.addressable_shards} == {(2 // bsplit, cache.max_length // sp)}
