"""Vision token layout against the reference's frame tokens and prompt splicing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_serve.tokenizers import vision_layout as vl
from lwm_serve.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def tok(reference_dir: Path) -> TextTokenizer:
    return TextTokenizer(reference_dir / "tokenizer")


def _case(reference_dir: Path, name: str) -> tuple[dict, dict]:
    case_dir = reference_dir / "cases" / name
    data = np.load(case_dir / "data.npz")
    return json.loads((case_dir / "case.json").read_text("utf-8")), {k: data[k] for k in data.files}


def test_constants() -> None:
    assert vl.TOKENS_PER_FRAME == vl.CODES_PER_FRAME + 1 == 257
    assert (vl.END_OF_FRAME, vl.END_OF_VISION) == (8192, 8193)


def test_vision_chat_layout_matches_reference_video_tokens(reference_dir: Path) -> None:
    _, data = _case(reference_dir, "vqgan")
    video = data["video_path_tokens"]  # what vision_chat made of a 5-frame video
    frames = video.reshape(-1, vl.TOKENS_PER_FRAME)[:, : vl.CODES_PER_FRAME]
    assert vl.frame_tokens(frames, layout="vision_chat") == video.tolist()
    standard = vl.frame_tokens(frames)
    assert standard[vl.CODES_PER_FRAME :: vl.TOKENS_PER_FRAME] == [vl.END_OF_FRAME] * (len(frames) - 1) + [
        vl.END_OF_VISION
    ]


def test_standard_layout_matches_forward_mixed(reference_dir: Path) -> None:
    case, _ = _case(reference_dir, "forward_mixed")
    tokens = vl.frame_tokens(case["frame_codes"])
    real = case["real_token_ids"]
    start = next(i for i in range(len(real)) if real[i : i + len(tokens)] == tokens)
    assert real[start + len(tokens) - 1] == vl.END_OF_VISION


def test_layouts_agree_on_one_image(reference_dir: Path) -> None:
    _, data = _case(reference_dir, "vqgan")
    image = data["codes"][:1]
    assert vl.frame_tokens(image) == vl.frame_tokens(image, layout="vision_chat") == data["png_path_tokens"].tolist()


def test_vision_segment_matches_forward_mixed(reference_dir: Path, tok: TextTokenizer) -> None:
    case, _ = _case(reference_dir, "forward_mixed")
    ids, mask = vl.vision_segment(tok, case["frame_codes"])
    real = case["real_token_ids"]
    # The segment sits right after the encoded question in the reference row.
    start = len(tok.encode(case["text_1"]))
    assert real[start : start + len(ids)] == ids
    n_frames = len(case["frame_codes"])
    assert sum(mask) == vl.num_vision_tokens(n_frames)
    assert len(ids) == vl.vision_segment_length(tok, n_frames)
    first = mask.index(True)
    assert ids[:first] == tok.encode(case["vision_start"])
    assert ids[first + sum(mask) :] == tok.encode(case["vision_end"])


@settings(max_examples=50, deadline=None)
@given(n_frames=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_frames_round_trip(n_frames: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, vl.NUM_CODES, size=(n_frames, 16, 16))
    tokens = vl.frame_tokens(codes)
    assert len(tokens) == vl.num_vision_tokens(n_frames)
    delimiters = tokens[vl.CODES_PER_FRAME :: vl.TOKENS_PER_FRAME]
    assert delimiters == [vl.END_OF_FRAME] * (n_frames - 1) + [vl.END_OF_VISION]
    np.testing.assert_array_equal(vl.frames_from_tokens(tokens), codes)
    assert vl.frame_tokens(codes.reshape(n_frames, -1)) == tokens


@pytest.mark.parametrize("name", ["generate_image_greedy", "generate_image_cfg"])
def test_generated_frames_with_forced_8192_parse(reference_dir: Path, name: str) -> None:
    case, data = _case(reference_dir, name)
    codes = vl.frames_from_tokens(case["image_tokens_257"])
    np.testing.assert_array_equal(codes, data["image_codes"])  # codes >= 8192 kept as the reference does


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 256), int), np.zeros((1, 255), int), np.full((1, 256), 8192), np.full((1, 256), -1),
     np.zeros((1, 256), float), np.zeros(256, int)],
    ids=["no-frames", "short-frame", "code-too-big", "negative", "float", "1-d"],
)
def test_bad_codes_raise(bad: np.ndarray) -> None:
    with pytest.raises(vl.VisionLayoutError):
        vl.frame_tokens(bad)


def test_bad_tokens_raise() -> None:
    good = vl.frame_tokens(np.zeros((2, 256), int))
    with pytest.raises(vl.VisionLayoutError, match="whole number"):
        vl.frames_from_tokens(good[:-1])
    broken = list(good)
    broken[256] = 5
    with pytest.raises(vl.VisionLayoutError, match="delimiters"):
        vl.frames_from_tokens(broken)
    assert vl.frames_from_tokens(broken, strict=False).shape == (2, 16, 16)
    with pytest.raises(vl.VisionLayoutError, match=">= 0"):
        vl.frames_from_tokens([-1] + good[1:])
    with pytest.raises(vl.VisionLayoutError, match="layout"):
        vl.frame_tokens(np.zeros((1, 256), int), layout="other")  # type: ignore[arg-type]
    with pytest.raises(vl.VisionLayoutError):
        vl.num_vision_tokens(-1)
