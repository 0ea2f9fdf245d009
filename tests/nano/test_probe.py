"""The training-time held-out check (nano/probe.py): teacher-forced answer accuracy per question type."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lwm_serve.model import checkpoint
from lwm_serve.model import config as model_config
from lwm_serve.nano import probe
from lwm_serve.nano import train_lm as tl
from lwm_serve.server import runtime
from lwm_serve.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def shipped():
    root = runtime.nano_dir()
    cfg = model_config.from_reference_json(root / "config.json")
    params = checkpoint.load_checkpoint(str(root / "params"), cfg)
    with open(root / "vqgan" / "vqgan_params.pkl", "rb") as f:
        vq_params = pickle.load(f)
    return cfg, params, vq_params, TextTokenizer(root / "tokenizer")


@pytest.fixture(scope="module")
def held_out(shipped):
    cfg, params, vq_params, tok = shipped
    return probe.build(tok, vq_params, videos=8, images=6, detail=True)


def test_every_question_of_the_held_out_media_is_asked_once(held_out):
    labels = [label for _, kinds, _ in held_out.batches for label in kinds]
    assert len(labels) == held_out.size > 14
    assert {label.split("/")[0] for label in labels} == {"shape", "color", "direction", "count"}
    assert not any(label.startswith("direction/image") for label in labels)
    for batch, kinds, decisive in held_out.batches:
        # every row is one question whose reply has at least one answer-deciding token
        assert decisive.shape == batch.ids.shape and (decisive.sum(axis=1) >= 1).all()


def test_the_shipped_model_names_the_colour_of_a_lone_object_and_a_blank_head_nothing(shipped, held_out):
    cfg, params, _, _ = shipped
    acc = probe.accuracy(params, cfg, held_out, tl.causal_blocked_attention)
    lone = [k for k in acc["n"] if k.startswith("color/") and k.endswith("/1")]
    assert lone and all(acc[k] == 1.0 for k in lone), acc
    blank = dict(params, lm_head={"kernel": np.zeros_like(params["lm_head"]["kernel"])})
    assert probe.accuracy(blank, cfg, held_out, tl.causal_blocked_attention)["all"] == 0.0


def test_next_code_by_frame_reads_each_frame_s_object_codes(shipped):
    cfg, params, vq_params, tok = shipped
    shares = probe.next_code_by_frame(params, cfg, tok, vq_params, tl.causal_blocked_attention, videos=6)
    frames = {f for _, f in shares}
    assert frames == {0, 1, 2, 3} and all(0.0 <= v <= 1.0 for v in shares.values())
    # The shipped model has learnt the frame's own shapes (about half the object codes right,
    # against 1/1024 by chance): targets out of step with the codes would give next to nothing.
    assert min(shares.values()) > 0.2, shares
    blank = dict(params, vision_head={"kernel": np.zeros_like(params["vision_head"]["kernel"])})
    zeros = probe.next_code_by_frame(blank, cfg, tok, vq_params, tl.causal_blocked_attention, videos=6)
    assert max(zeros.values()) < 0.05, zeros
