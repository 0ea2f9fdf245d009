"""The capacity planner against real sharded arrays and XLA's compiled memory analysis."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from lwm_serve.model import params as params_lib
from lwm_serve.model import planner, sharding, steps
from lwm_serve.model.config import ModelConfig, from_preset
from lwm_serve.model.mesh import make_mesh
from lwm_serve.model.planner import GIB, CapacityError, MeshShape

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, vision_vocab_size=64,
                  scan_query_chunk_size=64, scan_key_chunk_size=64)


def _max_device_bytes(tree) -> int:
    per_device: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


@pytest.mark.parametrize("spec", ["1,1,1,8", "1,2,2,2", "2,1,1,4", "1,1,8,1", "8,1,1,1"])
def test_param_and_cache_bytes_equal_what_is_allocated(spec):
    mesh = make_mesh(spec)
    shape = MeshShape.of(mesh)
    params = sharding.shard_params(params_lib.init_params(CFG, jax.random.PRNGKey(0)), CFG, mesh)
    want_params, problems = planner.param_bytes_per_device(CFG, shape, "float32")
    assert problems == []
    assert _max_device_bytes(params) == want_params
    cache = sharding.init_sharded_cache(CFG, 2, 100, mesh)
    assert _max_device_bytes(cache) == planner.kv_cache_bytes_per_device(CFG, shape, "float32", 100, 2)


@pytest.mark.parametrize("sp", [1, 4])
def test_prefill_estimate_bounds_compiled_temporaries(sp):
    """The prefill figure is conservative: >= XLA's temp allocation of the compiled step."""
    mesh = make_mesh(f"1,1,1,{sp}", jax.devices()[:sp])
    t = 512
    params = sharding.shard_params(params_lib.init_params(CFG, jax.random.PRNGKey(0)), CFG, mesh)
    cache = sharding.init_sharded_cache(CFG, 1, t, mesh)
    ids = jnp.zeros((1, t), jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    compiled = steps.prefill_chunk.lower(params, CFG, ids, jnp.zeros((1, t), bool), jnp.ones((1, t), jnp.int32),
                                         pos, cache, "text", mesh).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    estimate = planner.prefill_bytes_per_device(CFG, MeshShape.of(mesh), "float32", 1, t)
    assert measured > 0
    assert estimate >= measured, (estimate, measured)
    assert estimate < 8 * measured, "estimate is too loose to be useful"


def test_seven_b_at_one_million_tokens():
    cfg = from_preset("7b-1m")
    ok = planner.check_fits(cfg, MeshShape(1, 1, 4, 64), dtype="bf16", context=1 << 20, device_memory=32 * GIB)
    # 2 (k, v) x 32 layers x 1M slots x 4096 x 2 bytes, split over 256 devices.
    assert ok.kv_cache_bytes >= 2 * 32 * (1 << 20) * 4096 * 2 // 256
    with pytest.raises(CapacityError, match=r"does not fit mesh 1,1,1,8.*KV cache"):
        planner.check_fits(cfg, MeshShape(1, 1, 1, 8), dtype="bf16", context=1 << 20, device_memory=32 * GIB)


def test_suggestion_is_offered_when_another_mesh_fits():
    cfg = from_preset("7b")
    # dp=8 replicates the weights and cannot split a batch of 1: does not fit 2 GiB devices.
    bad = MeshShape(8, 1, 1, 1)
    with pytest.raises(CapacityError, match=r"mesh \d+,\d+,\d+,\d+ fits on the same 8 devices") as e:
        planner.check_fits(cfg, bad, dtype="bf16", context=4096, device_memory=4 * GIB)
    best = planner.suggest_meshes(cfg, 8, dtype="bf16", context=4096, device_memory=4 * GIB)
    assert best and all(p.fits for p in best)
    assert str(best[0].mesh) in str(e.value)


def test_indivisible_parameters_do_not_fit():
    cfg = CFG.replace(intermediate_size=172)  # 172 = 4 * 43: does not split over tp=8
    p = planner.plan(cfg, MeshShape(1, 1, 8, 1), dtype="fp32", context=128, device_memory=GIB)
    assert not p.fits and any("w1" in x for x in p.problems)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_param_bytes_follow_the_declarations(scan_layers):
    """Bytes per device are the declared shapes split by the declared axes' rules."""
    cfg = CFG.replace(scan_layers=scan_layers)
    mesh = MeshShape(1, 2, 2, 2)
    total = 0
    for info in params_lib.param_infos(cfg).values():
        spec = sharding.spec_for(info.axes, info.shape, mesh)  # type: ignore[arg-type]
        local = 1
        for i, size in enumerate(info.shape):
            entry = spec[i] if i < len(spec) else None
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            split = 1
            for a in axes:
                split *= mesh.shape[a]
            local *= size // split
        total += local * 4
    assert planner.param_bytes_per_device(cfg, mesh, "float32") == (total, [])
    # both layouts hold the same bytes
    other = planner.param_bytes_per_device(cfg.replace(scan_layers=not scan_layers), mesh, "float32")
    assert other == (total, [])


def test_cli_prints_a_table_and_json(capsys):
    code = planner.main(["--model", "7b", "--mesh", "1,1,4,64", "--dtype", "bf16", "--context", "1048576",
                         "--device-memory", "32GiB", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("parameters", "KV cache", "prefill peak", "fits: yes"):
        assert word in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["mesh"] == "1,1,4,64" and record["fits"] is True
    assert planner.main(["--model", "7b", "--mesh", "1,1,1,8", "--context", "1048576",
                         "--device-memory", "tpu-v4"]) == 1
    assert planner.main(["--model", "7b", "--mesh", "1,1,3,8", "--devices", "8", "--context", "16"]) == 2
    assert "error:" in capsys.readouterr().out


@pytest.mark.parametrize("text, value", [("32GiB", 32 * GIB), ("80GB", 80 * 10 ** 9), ("16g", 16 * GIB),
                                          ("h100", 80 * GIB), ("1024", 1024)])
def test_parse_bytes(text, value):
    assert planner.parse_bytes(text) == value
