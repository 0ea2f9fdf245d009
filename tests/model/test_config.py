"""Model config: presets, reference JSON, Hugging Face JSON, validation."""

from __future__ import annotations

import json

import pytest

from lwm_serve.model import config as C
from lwm_serve.model.params import param_shapes


def test_reference_json_loads_every_field(reference_dir):
    raw = json.loads((reference_dir / "model" / "config.json").read_text())
    cfg = C.from_reference_json(reference_dir / "model" / "config.json")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_sequence_length", "theta", "rms_norm_eps", "vision_vocab_size", "vocab_size",
                "scan_layers", "param_scan_axis", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, key) == raw[key], key
    assert cfg.head_dim == raw["hidden_size"] // raw["num_attention_heads"]


def test_presets_sizes():
    seven = C.from_preset("7b")
    assert (seven.hidden_size, seven.num_hidden_layers, seven.intermediate_size) == (4096, 32, 11008)
    assert C.from_preset("7b-1m").theta == 50_000_000.0
    bench = C.from_preset("bench-150m")
    assert 140e6 < bench.num_params() < 160e6
    assert bench.theta == 10_000_000.0
    assert {"debug", "200m", "1b", "3b", "13b", "30b", "65b", "demo"} <= set(C.preset_names())
    with pytest.raises(ValueError, match="unknown model preset"):
        C.from_preset("nope")


def test_num_params_matches_param_shapes():
    for name in ("demo", "bench-150m", "7b"):
        cfg = C.from_preset(name)
        total = 0
        for shape in param_shapes(cfg).values():
            n = 1
            for s in shape:
                n *= s
            total += n
        assert total == cfg.num_params(), name


def test_hf_llama_config(tmp_path):
    hf = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
          "max_position_embeddings": 1048576, "rope_theta": 50000000.0, "rms_norm_eps": 1e-5,
          "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    cfg = C.from_hf_json(path)
    assert cfg.theta == 5e7 and cfg.max_sequence_length == 1048576 and cfg.rms_norm_eps == 1e-5
    assert cfg.vision_vocab_size == 0 and not cfg.scan_layers and cfg.num_key_value_heads is None
    with pytest.raises(ValueError, match="rope_scaling"):
        C.from_hf_dict({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})


@pytest.mark.parametrize("bad", [
    dict(hidden_size=100, num_attention_heads=3),
    dict(num_attention_heads=4, num_key_value_heads=3, hidden_size=64),
    dict(param_scan_axis=2),
    dict(dtype="int8"),
])
def test_invalid_configs_fail_early(bad):
    with pytest.raises(ValueError):
        C.ModelConfig(**bad)
