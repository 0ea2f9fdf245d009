"""Generation against the reference's sampled and greedy outputs (fixture cases).

Text cases replay transformers' Flax `generate` (greedy, or temperature with
the implicit top_k=50) from the reference's key chain; vision cases replay
`vision_generation` (CFG image, then video frames) with its key chain.
"""

from __future__ import annotations

import numpy as np
import pytest

from lwm_serve.model.generation import (ContextLengthError, Generator, PromptRow,
                                        reference_chat_key, reference_vision_keys, seed_key)
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.tokenizers.vision_layout import generated_frame_delimiter

HF_DEFAULT_TOP_K = 50  # GenerationConfig's default, applied by the reference when sampling


def _rows(ids: np.ndarray, vision_masks: np.ndarray, attention_mask: np.ndarray) -> list[PromptRow]:
    rows = []
    for i, v, a in zip(ids, vision_masks, attention_mask):
        keep = a.astype(bool)
        rows.append(PromptRow(i[keep].tolist(), v[keep].tolist()))
    return rows


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _text_case(gen: Generator, case: dict, d: dict) -> None:
    rows = _rows(d["input_ids"], d["vision_masks"], d["attention_mask"])
    gc = case.get("generation_config", {})
    eos = gc.get("eos_token_id", gen.cfg.eos_token_id)
    if gc.get("do_sample"):
        sampling = SamplingParams(temperature=gc.get("temperature", 1.0),
                                  top_k=gc.get("top_k", HF_DEFAULT_TOP_K), top_p=gc.get("top_p", 1.0))
        key = reference_chat_key(case["flags"]["seed"])
    else:
        sampling, key = SamplingParams(temperature=0.0), seed_key(0)
    expected = d["output_ids"]
    got = gen.generate(rows, sampling, max_new_tokens=expected.shape[1], key=key, stop_token_ids=[eos])
    for row_got, row_want in zip(got, expected.tolist()):
        assert row_got == _until_eos(row_want, eos)


def _vision_case(gen: Generator, case: dict, d: dict) -> None:
    flags = case["flags"]
    n_frames = flags.get("n_frames", 1)
    keys = reference_vision_keys(flags["seed"], 2 if n_frames > 1 else 1)
    rows = _rows(d["image_prompt_input_ids"], np.zeros_like(d["image_prompt_input_ids"], bool),
                 d["image_prompt_attention_mask"])
    sampling = SamplingParams(temperature=flags["temperature_image"], top_k=flags["top_k_image"],
                              cfg_scale=flags["cfg_scale_image"])
    image = gen.generate(rows[:1], sampling, uncond_rows=rows[1:], max_new_tokens=257, key=keys[0],
                         head="vision", forced_tokens=generated_frame_delimiter)[0]
    assert image == case["image_tokens_257"]
    np.testing.assert_array_equal(np.asarray(image[:256]).reshape(16, 16), d["image_codes"][0])
    if n_frames == 1:
        return
    rows = [PromptRow(r.ids + image, [False] * len(r.ids) + [True] * len(image))
            for r in _rows(d["video_prompt_input_ids"], np.zeros_like(d["video_prompt_input_ids"], bool),
                           d["video_prompt_attention_mask"])]
    sampling = SamplingParams(temperature=flags["temperature_video"], top_k=flags["top_k_video"],
                              cfg_scale=flags["cfg_scale_video"])
    video = gen.generate(rows[:1], sampling, uncond_rows=rows[1:], max_new_tokens=(n_frames - 1) * 257,
                         key=keys[1], head="vision", forced_tokens=generated_frame_delimiter)[0]
    frames = [image[:256]] + [video[i * 257: i * 257 + 256] for i in range(n_frames - 1)]
    np.testing.assert_array_equal(np.asarray(frames), np.asarray(case["video_frames_codes"]))
    np.testing.assert_array_equal(np.asarray(frames).reshape(-1, 16, 16), d["video_codes"])


def test_generation_matches_reference(generation_case, reference_case_set):
    rs = reference_case_set
    case, d = rs.load_case(generation_case)
    params_name = rs.case_checkpoint(case)
    gen = Generator(rs.params(params_name), rs.file_config(params_name))
    if "output_ids" in d:
        _text_case(gen, case, d)
    else:
        _vision_case(gen, case, d)


def test_seed_reproducible_and_seeds_differ(reference_params, reference_config):
    gen = Generator(reference_params(), reference_config())
    rows = [PromptRow([1, 3, 4, 5, 6])]
    sp = SamplingParams(temperature=1.0)
    a = gen.generate(rows, sp, max_new_tokens=12, key=seed_key(7))
    b = gen.generate(rows, sp, max_new_tokens=12, key=seed_key(7))
    c = gen.generate(rows, sp, max_new_tokens=12, key=seed_key(8))
    assert a == b
    assert a != c


def test_stop_token_ends_row_and_stream_can_be_closed(reference_params, reference_config):
    gen = Generator(reference_params(), reference_config())
    rows = [PromptRow([1, 3, 4])]
    greedy = gen.generate(rows, SamplingParams(temperature=0), max_new_tokens=6, key=seed_key(0))[0]
    stop = greedy[2]
    first = greedy.index(stop)
    got = gen.generate(rows, SamplingParams(temperature=0), max_new_tokens=6, key=seed_key(0),
                       stop_token_ids=[stop])[0]
    assert got == greedy[: first + 1]
    stream = gen.stream(rows, SamplingParams(temperature=0), max_new_tokens=50, key=seed_key(0))
    steps = [next(stream) for _ in range(3)]
    stream.close()  # the consumer stops: no further model steps run
    assert [s.index for s in steps] == [0, 1, 2]


def test_context_limit_is_enforced(reference_params, reference_config):
    gen = Generator(reference_params(), reference_config(), max_context=64)
    with pytest.raises(ContextLengthError, match="64"):
        gen.generate([PromptRow(list(range(3, 60)))], SamplingParams(), max_new_tokens=10, key=seed_key(0))


def test_chunked_prefill_equals_one_shot(reference_params, reference_config):
    """A prompt of 8 chunks, prefilled chunk by chunk, samples what one-shot prefill does."""
    params, cfg = reference_params(), reference_config()
    rng = np.random.default_rng(1)
    prompt = [1] + rng.integers(3, cfg.vocab_size, size=8 * 128 - 1).tolist()
    rows = [PromptRow(prompt)]
    one_shot = Generator(params, cfg, prefill_chunk=4096)
    chunked = Generator(params, cfg, prefill_chunk=128)
    seen = []
    kwargs = dict(max_new_tokens=8, key=seed_key(3))
    a = one_shot.generate(rows, SamplingParams(temperature=0), **kwargs)
    b = list(chunked.stream(rows, SamplingParams(temperature=0), on_prefill_chunk=lambda i, n: seen.append((i, n)),
                            **kwargs))
    assert seen[-1] == (8, 8)
    assert a[0] == [int(s.tokens[0]) for s in b]
