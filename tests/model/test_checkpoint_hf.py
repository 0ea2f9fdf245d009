"""Hugging Face LLaMA safetensors checkpoints (LWM-Text): names, RoPE row order, round trip."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lwm_serve.model import checkpoint as ck
from lwm_serve.model.config import ModelConfig


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tp"))


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
