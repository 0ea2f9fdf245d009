"""How frames of VQGAN codes sit in the token stream (ints only, no JAX).

A frame is 256 VQGAN codes (a 16x16 grid, row major) followed by one
delimiter — 257 tokens per frame. These ids index the vision vocabulary
(`vte` / `vision_head`), so every one of them has `vision_mask` True.

Two delimiter layouts exist in the reference (`FrameLayout`):
  * "standard": END_OF_FRAME (8192) after every frame but the last,
    END_OF_VISION (8193) after the last one. This is the layout of LWM's
    training data (`lwm/data.py`) and of the fixture's `forward_mixed` row.
  * "vision_chat": END_OF_VISION after EVERY frame. This is what the
    reference's `vision_chat._read_process_vision` really produces for a
    video (it encodes one frame per batch and ends each batch with 8193; see
    the fixture's `video_path_tokens`). For one image both layouts agree.

A vision segment is wrapped in the TEXT strings `<vision>` and `</vision>`,
each tokenized by its own `tokenizer.encode(...)` call and therefore carrying
its own BOS, exactly as the reference's `vision_chat.construct_input` splices
them:

    encode('<vision>') + frame_tokens(codes) + encode('</vision>')
    vision_mask:  False...    True...              False...
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol, Sequence

import numpy as np

logger = logging.getLogger(__name__)

CODES_PER_FRAME = 256  # 16 x 16 VQGAN codes per 256 x 256 frame
TOKENS_PER_FRAME = CODES_PER_FRAME + 1  # codes + one delimiter
NUM_CODES = 8192  # VQGAN codebook size: valid codes are 0..8191
END_OF_FRAME = 8192
END_OF_VISION = 8193
VISION_START_TEXT = "<vision>"
VISION_END_TEXT = "</vision>"

FrameLayout = Literal["standard", "vision_chat"]


def generated_frame_delimiter(step: int) -> int | None:
    """The token dictated at generation step `step` (0 = first new vision token).

    Generated frames are 256 sampled codes, then END_OF_FRAME forced rather than
    sampled, as the reference's `_sample_vision` does; None for sampled steps.
    """
    return END_OF_FRAME if (step + 1) % TOKENS_PER_FRAME == 0 else None


class VisionLayoutError(ValueError):
    """Frame codes or vision tokens that do not follow the layout."""


class Encoder(Protocol):
    """Anything with the reference tokenizer's `encode` (BOS prepended)."""

    def encode(self, text: str) -> list[int]: ...


def _as_frames(frame_codes: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Validates codes into an int64 array [n_frames, 256]."""
    codes = np.asarray(frame_codes)
    if codes.size == 0 or codes.ndim < 2:
        raise VisionLayoutError(
            f"frame codes must be [n_frames, 256] or [n_frames, 16, 16] with n_frames >= 1, got shape {codes.shape}"
        )
    if not np.issubdtype(codes.dtype, np.integer):
        raise VisionLayoutError(f"frame codes must be integers, got dtype {codes.dtype}")
    codes = codes.reshape(codes.shape[0], -1).astype(np.int64)
    if codes.shape[1] != CODES_PER_FRAME:
        raise VisionLayoutError(f"a frame has {CODES_PER_FRAME} codes, got {codes.shape[1]}")
    if codes.min() < 0 or codes.max() >= NUM_CODES:
        raise VisionLayoutError(f"VQGAN codes must lie in [0, {NUM_CODES}), got [{codes.min()}, {codes.max()}]")
    return codes


def frame_tokens(
    frame_codes: Sequence[Sequence[int]] | np.ndarray, *, layout: FrameLayout = "standard"
) -> list[int]:
    """Vision tokens of a clip: each frame's codes then its delimiter.

    Args:
        frame_codes: VQGAN codes, [n_frames, 256] or [n_frames, 16, 16], n_frames >= 1.
        layout: "standard": 8192 after each frame except the last, which gets
            8193; "vision_chat": 8193 after every frame (module docstring).

    Returns:
        n_frames * 257 ids.
    """
    codes = _as_frames(frame_codes)
    if layout not in ("standard", "vision_chat"):
        raise VisionLayoutError(f"unknown frame layout {layout!r}")
    delimiters = np.full((codes.shape[0], 1), END_OF_FRAME, dtype=np.int64)
    if layout == "vision_chat":
        delimiters[:] = END_OF_VISION
    delimiters[-1, 0] = END_OF_VISION
    return np.concatenate([codes, delimiters], axis=1).reshape(-1).tolist()


def num_vision_tokens(n_frames: int) -> int:
    """Tokens that `n_frames` frames take inside a segment (257 each)."""
    if n_frames < 0:
        raise VisionLayoutError(f"n_frames must be >= 0, got {n_frames}")
    return n_frames * TOKENS_PER_FRAME


def vision_segment(
    tokenizer: Encoder,
    frame_codes: Sequence[Sequence[int]] | np.ndarray,
    *,
    layout: FrameLayout = "standard",
) -> tuple[list[int], list[bool]]:
    """A wrapped vision segment, as the reference splices it into a prompt.

    Args:
        tokenizer: text tokenizer whose `encode` prepends BOS.
        frame_codes: VQGAN codes, [n_frames, 256] or [n_frames, 16, 16].
        layout: delimiter layout, see `frame_tokens`.

    Returns:
        (ids, vision_mask): `encode('<vision>') + frame_tokens + encode('</vision>')`
        and a mask True exactly on the frame tokens (delimiters included).
    """
    start = tokenizer.encode(VISION_START_TEXT)
    end = tokenizer.encode(VISION_END_TEXT)
    vision = frame_tokens(frame_codes, layout=layout)
    ids = start + vision + end
    mask = [False] * len(start) + [True] * len(vision) + [False] * len(end)
    return ids, mask


def wrapper_length(tokenizer: Encoder) -> int:
    """Tokens of a segment's text wrapper: encode('<vision>') + encode('</vision>')."""
    return len(tokenizer.encode(VISION_START_TEXT)) + len(tokenizer.encode(VISION_END_TEXT))


def vision_segment_length(tokenizer: Encoder, n_frames: int) -> int:
    """Total tokens of `vision_segment` for a clip of `n_frames` frames."""
    return wrapper_length(tokenizer) + num_vision_tokens(n_frames)


def frames_from_tokens(tokens: Sequence[int] | np.ndarray, *, strict: bool = True) -> np.ndarray:
    """Splits generated vision tokens back into frames of codes.

    The reference forces the 257th token of every generated frame to 8192 and
    drops it before decoding; either delimiter is accepted here. Codes are
    NOT capped at 8192: the vision head has 8448 rows, so sampling can yield
    e.g. 8428 inside a frame, and the reference hands it to the VQGAN as is
    (its codebook gather clamps it to the last row); only negatives are errors.

    Args:
        tokens: n_frames * 257 vision ids (a trailing partial frame is an error).
        strict: check every delimiter; when False the delimiter
            positions are dropped unchecked (codes are still range checked).

    Returns:
        int32 codes [n_frames, 16, 16] for the VQGAN decoder.
    """
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if arr.size % TOKENS_PER_FRAME:
        raise VisionLayoutError(f"{arr.size} vision tokens is not a whole number of {TOKENS_PER_FRAME}-token frames")
    frames = arr.reshape(-1, TOKENS_PER_FRAME)
    codes, delimiters = frames[:, :CODES_PER_FRAME], frames[:, CODES_PER_FRAME]
    if strict and not np.isin(delimiters, (END_OF_FRAME, END_OF_VISION)).all():
        raise VisionLayoutError(
            f"frame delimiters must be {END_OF_FRAME} or {END_OF_VISION}, got {delimiters.tolist()}"
        )
    if codes.size and codes.min() < 0:
        raise VisionLayoutError(f"vision codes must be >= 0, got {codes.min()}")
    side = int(round(CODES_PER_FRAME**0.5))
    return codes.reshape(-1, side, side).astype(np.int32)
