"""Loading runtimes: the embedded demo, the reference checkpoint, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from lwm_serve.model.generation import PromptRow, seed_key
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server import runtime


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LWM_SERVE_HOME", str(tmp_path))
    return tmp_path


def test_demo_builds_once_and_generates(home):
    rt = runtime.load_runtime("demo", progress=False)
    first_params = (home / f"demo-{runtime.DEMO_VERSION}" / "params").stat().st_mtime_ns
    assert rt.model_name == "lwm-demo"
    assert rt.tokenizer.vocab_size == rt.cfg.vocab_size
    assert rt.vqgan is not None
    ids = rt.tokenizer.encode("What happens in the video?")
    out = rt.generator.generate([PromptRow(ids)], SamplingParams(temperature=0), max_new_tokens=5,
                                key=seed_key(0))
    assert len(out[0]) >= 1
    # A second load reuses the cached files (and so gives the same model).
    rt2 = runtime.load_runtime("demo", progress=False)
    assert (home / f"demo-{runtime.DEMO_VERSION}" / "params").stat().st_mtime_ns == first_params
    out2 = rt2.generator.generate([PromptRow(ids)], SamplingParams(temperature=0), max_new_tokens=5,
                                  key=seed_key(0))
    assert out == out2


def test_reference_checkpoint_with_config_beside_it(reference_dir):
    rt = runtime.load_runtime(f"params::{reference_dir / 'model' / 'params_scan'}",
                              tokenizer=str(reference_dir / "tokenizer"),
                              vqgan=str(reference_dir / "vqgan" / "vqgan_params.pkl"), progress=False)
    assert rt.cfg.hidden_size == 64 and rt.model_name == "params_scan"
    assert rt.vqgan.cfg.hidden_channels == 32


def test_missing_tokenizer_is_refused(reference_dir):
    with pytest.raises(runtime.LoadError, match="tokenizer"):
        runtime.load_runtime(str(reference_dir / "model" / "params_scan"), progress=False)


def test_vocab_mismatch_is_refused(reference_dir, tmp_path):
    raw = json.loads((reference_dir / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "vocab_size": 512}))
    shutil.copy(reference_dir / "model" / "params_scan", tmp_path / "params")
    with pytest.raises(runtime.LoadError, match="768 tokens"):
        runtime.load_runtime(str(tmp_path / "params"), tokenizer=str(reference_dir / "tokenizer"),
                             progress=False)


def test_missing_config_and_checkpoint_are_clear(tmp_path, reference_dir):
    (tmp_path / "params").write_bytes(b"")
    with pytest.raises(runtime.LoadError, match="model config"):
        runtime.load_runtime(str(tmp_path / "params"), tokenizer=str(reference_dir / "tokenizer"))
    with pytest.raises(runtime.LoadError, match="neither a preset"):
        runtime.load_runtime(str(tmp_path / "params"), model_config_spec="nope.json")
    with pytest.raises(runtime.LoadError, match="checkpoint not found"):
        runtime.load_runtime(str(tmp_path / "missing"), model_config_spec="demo",
                             tokenizer=str(reference_dir / "tokenizer"))


def test_max_model_len_beyond_model_is_refused(reference_dir):
    with pytest.raises(runtime.LoadError, match="exceeds"):
        runtime.load_runtime(str(reference_dir / "model" / "params_scan"),
                             tokenizer=str(reference_dir / "tokenizer"), max_model_len=10**7)


def test_context_that_cannot_fit_is_refused_before_loading(reference_dir):
    """The planner runs at start: 8K tokens of the fixture model do not fit in 1 MiB."""
    with pytest.raises(runtime.LoadError, match="does not fit"):
        runtime.load_runtime(str(reference_dir / "model" / "params_scan"),
                             tokenizer=str(reference_dir / "tokenizer"), device_memory=1 << 20)


def test_prefill_chunk_defaults_to_the_measured_choice_and_a_flag_wins(home, caplog):
    from lwm_serve.model import chunking
    from lwm_serve.model.mesh import make_mesh
    from lwm_serve.server.config import ServerSettings

    assert ServerSettings().prefill_chunk is None  # no fixed default: chosen per model and mesh
    with caplog.at_level("INFO", logger="lwm_serve.server.runtime"):
        rt = runtime.load_runtime("demo", progress=False)
    assert rt.generator.prefill_chunk == chunking.choose_prefill_chunk(rt.cfg) == chunking.CPU_SATURATION_TOKENS
    assert any("prefill chunk: 512 tokens (chosen" in r.getMessage() for r in caplog.records)
    assert runtime.load_runtime("demo", progress=False, prefill_chunk=96).generator.prefill_chunk == 96
    # per sequence shard: a mesh with sp = 4 prefills 4 x 512 tokens per step
    import jax

    sp4 = make_mesh("1,1,1,4", jax.devices()[:4])
    assert runtime.resolve_prefill_chunk(rt.cfg, sp4, None) == chunking.choose_prefill_chunk(rt.cfg, 4) == 2048
