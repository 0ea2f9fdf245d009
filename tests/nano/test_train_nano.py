"""`lwm-serve train-nano --quick`: the whole training pipeline writes a model the server loads."""

from __future__ import annotations

import json

import jax

from lwm_serve.model.generation import PromptRow
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server import runtime
from lwm_serve.server.cli import main
from lwm_serve.tokenizers import chat_template as ct


def test_quick_recipe_trains_a_model_the_server_loads(tmp_path):
    out = tmp_path / "nano"
    assert main(["train-nano", "--quick", "--out", str(out)]) == 0
    log = json.loads((out / "training.json").read_text())
    assert len(log["lm"]["losses"]) == log["recipe"]["steps"] > 0
    assert len(log["vqgan"]["decoder_mse"]) == log["recipe"]["decoder_steps"]
    assert (out / "losses.png").stat().st_size > 1000
    # the held-out check ran every 2 steps, on every question type of 2 videos and 2 images
    probes = log["lm"]["probe"]
    assert [step for step, _ in probes] == [2, 4]
    assert {"color", "count", "direction", "all"} <= set(probes[-1][1])
    assert all(0.0 <= acc[k] <= 1.0 for _, acc in probes for k in acc if k != "n")

    rt = runtime.load_runtime(str(out), progress=False)
    assert rt.model_name == "nano" and rt.vqgan is not None and rt.vqgan.cfg.hidden_channels == 32
    frames = rt.vqgan.decode_codes(rt.vqgan.encode_frames(
        __import__("numpy").zeros((1, 256, 256, 3), "float32") - 1))
    assert frames.shape == (1, 256, 256, 3)
    prompt = ct.chat_prompt(rt.tokenizer, "Hello!")
    tokens = rt.generator.generate([PromptRow(prompt.ids, prompt.vision_mask)], SamplingParams(),
                                   max_new_tokens=3, key=jax.random.PRNGKey(0))
    assert 1 <= len(tokens[0]) <= 3
