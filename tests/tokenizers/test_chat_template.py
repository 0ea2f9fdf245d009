"""Prompt construction against the reference's real prompt rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lwm_serve.tokenizers import chat_template as ct
from lwm_serve.tokenizers import vision_layout as vl
from lwm_serve.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def tok(reference_dir: Path) -> TextTokenizer:
    return TextTokenizer(reference_dir / "tokenizer")


def _case(reference_dir: Path, name: str) -> tuple[dict, dict]:
    case_dir = reference_dir / "cases" / name
    data = np.load(case_dir / "data.npz")
    return json.loads((case_dir / "case.json").read_text("utf-8")), {k: data[k] for k in data.files}


def _assert_rows_equal(got: tuple[np.ndarray, ...], ids: np.ndarray, vm: np.ndarray | None, am: np.ndarray) -> None:
    np.testing.assert_array_equal(got[0], ids)
    if vm is not None:
        np.testing.assert_array_equal(got[1], vm)
    np.testing.assert_array_equal(got[2], am)


# ------------------------------------------------------- reference rows
def test_chat_prompt_matches_forward_mixed(reference_dir: Path, tok: TextTokenizer) -> None:
    case, data = _case(reference_dir, "forward_mixed")
    row = ct.chat_prompt(tok, case["question"], [case["frame_codes"]])
    assert row.ids == case["real_token_ids"]
    valid = data["attention_mask"][0] == 1
    assert row.ids == data["input_ids"][0][valid].tolist()
    assert row.vision_mask == data["vision_masks"][0][valid].tolist()
    length = ct.chat_input_length(case["max_n_frames"], case["block_size"])
    assert length == data["input_ids"].shape[1]
    _assert_rows_equal(ct.left_pad([row], length), data["input_ids"], data["vision_masks"], data["attention_mask"])


@pytest.mark.parametrize("name", ["generate_chat_sampled", "generate_chat_greedy"])
def test_chat_prompt_from_png_matches_generation_rows(reference_dir: Path, tok: TextTokenizer, name: str) -> None:
    _, data = _case(reference_dir, name)
    sampled, _ = _case(reference_dir, "generate_chat_sampled")
    flags = sampled["flags"]
    question, max_n_frames = flags["prompt"], flags["max_n_frames"]
    chunks = re.findall(r"scan_(?:query|key)_chunk_size=(\d+)", flags["update_llama_config"])
    block_size = max(int(c) for c in chunks)  # times mesh sp = 1
    _, vq = _case(reference_dir, "vqgan")
    image_codes = vq["png_path_tokens"][: vl.CODES_PER_FRAME][None]  # the PNG's one frame
    row = ct.chat_prompt(tok, question, [image_codes], layout="vision_chat")
    assert row.ids == sampled["real_prompt_ids"]
    length = ct.chat_input_length(max_n_frames, block_size)
    assert length == data["input_ids"].shape[1]
    _assert_rows_equal(ct.left_pad([row], length), data["input_ids"], data["vision_masks"], data["attention_mask"])


def test_text_only_chat_is_the_reference_row_without_its_vision_segment(
    reference_dir: Path, tok: TextTokenizer
) -> None:
    case, _ = _case(reference_dir, "forward_mixed")
    segment, _ = vl.vision_segment(tok, case["frame_codes"])
    real = case["real_token_ids"]
    start = len(tok.encode(case["text_1"]))
    assert real[start : start + len(segment)] == segment
    expected = real[:start] + real[start + len(segment) :]
    row = ct.chat_prompt(tok, case["question"])
    assert row.ids == expected
    assert not any(row.vision_mask)


@pytest.mark.parametrize("name", ["generate_image_cfg", "generate_image_greedy", "generate_video_2frames"])
def test_generation_prompts_match_reference(reference_dir: Path, tok: TextTokenizer, name: str) -> None:
    case, data = _case(reference_dir, name)
    prompt = case["flags"]["prompt"]
    builders = [("image", ct.image_generation_prompt)]
    if "video_prompt_real_ids" in case:
        builders.append(("video", ct.video_generation_prompt))
    for kind, build in builders:
        cond, uncond = build(tok, prompt), ct.unconditional_prompt(tok)
        assert [cond.ids, uncond.ids] == case[f"{kind}_prompt_real_ids"]
        assert tok.encode(case[f"{kind}_prompt"]) == cond.ids
        assert tok.encode(case["uncond_prompt"]) == uncond.ids
        assert not any(cond.vision_mask) and not any(uncond.vision_mask)
        padded = ct.left_pad([cond, uncond], case["prefix_tokenizer_max_length"], truncate=True)
        ids, am = data[f"{kind}_prompt_input_ids"], data[f"{kind}_prompt_attention_mask"]
        _assert_rows_equal(padded, ids, np.zeros_like(ids, dtype=bool), am)


@pytest.mark.parametrize("name", ["forward_text", "generate_text_greedy"])
def test_completion_prompts_left_pad_like_reference(reference_dir: Path, tok: TextTokenizer, name: str) -> None:
    case, data = _case(reference_dir, name)
    rows = [ct.completion_prompt(tok, p) for p in case["prompts"]]
    _assert_rows_equal(ct.left_pad(rows), data["input_ids"], data["vision_masks"], data["attention_mask"])


# ------------------------------------------------------------ multi-turn
def test_single_user_message_is_the_reference_prompt(tok: TextTokenizer) -> None:
    codes = np.arange(2 * 256).reshape(2, 256) % vl.NUM_CODES
    reference = ct.chat_prompt(tok, "What is in the video?", [codes])
    built = ct.build_chat(tok, [ct.Message("user", "What is in the video?", (codes,))])
    assert built == reference
    explicit = ct.build_chat(
        tok, [ct.Message("system", ct.DEFAULT_SYSTEM), ct.Message("user", "What is in the video?", (codes,))]
    )
    assert explicit == reference


def test_multi_turn_follows_documented_chunks(tok: TextTokenizer) -> None:
    image = np.zeros((1, 256), dtype=np.int64)
    messages = [
        ct.Message("system", "Be brief."),
        ct.Message("user", "Hi", (image,)),
        ct.Message("assistant", "Hello!"),
        ct.Message("user", "Bye"),
    ]
    row = ct.build_chat(tok, messages)
    segment, segment_mask = vl.vision_segment(tok, image)
    chunks = [
        tok.encode("<s>Be brief. USER: Hi\n"),
        segment,
        tok.encode(" ASSISTANT: Hello!</s>"),
        tok.encode("USER: Bye\n"),
        tok.encode(" ASSISTANT:"),
    ]
    assert row.ids == [i for chunk in chunks for i in chunk]
    assert sum(row.vision_mask) == sum(segment_mask) == vl.num_vision_tokens(1)
    assert row.ids.count(tok.bos_id) >= len(chunks) + 1  # each chunk has its BOS, plus the literal <s>


def test_history_is_a_stable_prefix(tok: TextTokenizer) -> None:
    first = [ct.Message("user", "one")]
    second = first + [ct.Message("assistant", "two"), ct.Message("user", "three")]
    tail = len(tok.encode(ct.ASSISTANT_TAIL))
    a, b = ct.build_chat(tok, first), ct.build_chat(tok, second)
    assert b.ids[: len(a) - tail] == a.ids[:-tail]


def test_conversation_opening_with_assistant(tok: TextTokenizer) -> None:
    row = ct.build_chat(tok, [ct.Message("assistant", "Welcome."), ct.Message("user", "Thanks")])
    expected = (
        tok.encode(f"<s>{ct.DEFAULT_SYSTEM}")
        + tok.encode(" ASSISTANT: Welcome.</s>")
        + tok.encode("USER: Thanks\n")
        + tok.encode(" ASSISTANT:")
    )
    assert row.ids == expected


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "at least one user"),
        ([ct.Message("system", "s")], "at least one user"),
        ([ct.Message("user", "q"), ct.Message("assistant", "a")], "last message"),
        ([ct.Message("user", "q"), ct.Message("system", "s"), ct.Message("user", "q")], "only allowed first"),
        (
            [ct.Message("assistant", "a", (np.zeros((1, 256), int),)), ct.Message("user", "q")],
            "only user messages",
        ),
        ([ct.Message("tool", "a"), ct.Message("user", "q")], "unknown role"),  # type: ignore[arg-type]
    ],
    ids=["empty", "system-only", "assistant-last", "system-middle", "media-on-assistant", "unknown-role"],
)
def test_bad_conversations_raise(tok: TextTokenizer, messages: list, match: str) -> None:
    with pytest.raises(ct.TemplateError, match=match):
        ct.build_chat(tok, messages)


# -------------------------------------------------------------- padding
def test_left_pad_layout_and_errors() -> None:
    rows = [ct.PromptTokens([5, 6, 7], [False, True, False]), ct.PromptTokens([9], [True])]
    ids, vm, am = ct.left_pad(rows)
    assert ids.dtype == np.int32 and vm.dtype == bool and am.dtype == np.int32
    np.testing.assert_array_equal(ids, [[5, 6, 7], [ct.PAD_ID, ct.PAD_ID, 9]])
    np.testing.assert_array_equal(vm, [[False, True, False], [False, False, True]])
    np.testing.assert_array_equal(am, [[1, 1, 1], [0, 0, 1]])
    ids, vm, am = ct.left_pad(rows, 2, truncate=True)  # keeps the right end, like the reference
    np.testing.assert_array_equal(ids, [[6, 7], [ct.PAD_ID, 9]])
    np.testing.assert_array_equal(vm, [[True, False], [False, True]])
    with pytest.raises(ct.TemplateError, match="does not fit"):
        ct.left_pad(rows, 2)
    with pytest.raises(ct.TemplateError):
        ct.left_pad([])
    with pytest.raises(ct.TemplateError):
        ct.chat_input_length(1, 0)
