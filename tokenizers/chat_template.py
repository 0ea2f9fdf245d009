"""Prompts as the reference builds them: strings -> ids + vision_mask. Pure.

Every prompt is a list of CHUNKS, and each chunk is one `tokenizer.encode(...)`
call, so each chunk starts with its own BOS — that is how the reference's
`vision_chat.construct_input` splices its prompt, and how LWM's vision-text
training data was tokenized (one `encode` per field).

Single-turn chat (reference `construct_input`; `chat_prompt`):
    encode("<s>You are a helpful assistant. USER: {question}\n")
    [+ encode("<vision>") + frame tokens + encode("</vision>")]   # if media
    + encode(" ASSISTANT:")

Multi-turn chat (`build_chat`), our documented extension of that rule:
  * an optional first `system` message replaces "You are a helpful assistant."
    (the default when absent; any other position is an error);
  * the first chunk starts with "<s>{system} ";
  * a user turn is the chunk "USER: {content}\n", followed by one vision
    segment per media item attached to it (in order);
  * a past assistant turn is the chunk " ASSISTANT: {content}</s>" (if the
    conversation opens with one, the header "<s>{system}" is its own chunk);
  * the prompt ends with the chunk " ASSISTANT:" and the last message must be
    from the user.
  So `[user q (+media)]` with the default system gives exactly the reference's
  ids; `[user q1, assistant a1, user q2]` gives the chunks
  "<s>SYS USER: q1\n", " ASSISTANT: a1</s>", "USER: q2\n", " ASSISTANT:".

Generation prompts (reference `vision_generation`), each ONE encode call:
    image:  "<s>You are a helpful assistant. USER: Generate an image of {prompt} ASSISTANT: <vision>"
    video:  "<s>You are a helpful assistant. USER: Generate a video of {prompt} ASSISTANT: <vision>"
    uncond: "<s><vision>"    (the classifier-free-guidance partner row)

Batches are LEFT padded with id 0, vision_mask False, attention_mask 0
(`left_pad`), the reference's layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal, Sequence

import numpy as np

from lwm_serve.tokenizers import vision_layout
from lwm_serve.tokenizers.vision_layout import Encoder

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
ASSISTANT_TAIL = " ASSISTANT:"
UNCOND_PROMPT = "<s><vision>"
PAD_ID = 0  # the reference left-pads prompts with id 0 (np.zeros / pad token <unk>)
MIN_BUFFER_SIZE = 256  # vision_chat's min_buffer_size: room for text around the frames

Role = Literal["system", "user", "assistant"]
FrameCodes = np.ndarray | Sequence[Sequence[int]]  # [n_frames, 256] or [n_frames, 16, 16]


class TemplateError(ValueError):
    """The messages cannot be turned into a prompt (bad roles or order, too long)."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class Message:
    """One chat message. `media`: one VQGAN code array per image/video (user only)."""

    role: Role
    content: str
    media: tuple[FrameCodes, ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """One prompt row, unpadded. Both lists have the same length."""

    ids: list[int]
    vision_mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


class _Builder:
    """Accumulates chunks (ids + mask)."""

    def __init__(self, tokenizer: Encoder, layout: vision_layout.FrameLayout) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        self.ids: list[int] = []
        self.mask: list[bool] = []

    def text(self, text: str) -> None:
        ids = self.tokenizer.encode(text)
        self.ids += ids
        self.mask += [False] * len(ids)

    def vision(self, frame_codes: FrameCodes) -> None:
        ids, mask = vision_layout.vision_segment(self.tokenizer, frame_codes, layout=self.layout)
        self.ids += ids
        self.mask += mask

    def build(self) -> PromptTokens:
        return PromptTokens(self.ids, self.mask)


def chat_prompt(
    tokenizer: Encoder,
    question: str,
    media: Sequence[FrameCodes] = (),
    *,
    system: str = DEFAULT_SYSTEM,
    layout: vision_layout.FrameLayout = "standard",
) -> PromptTokens:
    """The reference's single-turn chat prompt (`construct_input`).

    Args:
        tokenizer: text tokenizer (`encode` prepends BOS).
        question: the user's text.
        media: VQGAN codes per image/video, each [n_frames, 256]; empty for text-only chat.
        system: the system sentence (the reference's is the default).
        layout: frame delimiter layout (`vision_layout.FrameLayout`).

    Returns:
        The unpadded row: ids and vision_mask.
    """
    messages = [Message("system", system), Message("user", question, tuple(media))]
    return build_chat(tokenizer, messages, layout=layout)


def build_chat(
    tokenizer: Encoder,
    messages: Sequence[Message],
    *,
    layout: vision_layout.FrameLayout = "standard",
) -> PromptTokens:
    """A multi-turn chat prompt (rule in the module docstring).

    Args:
        tokenizer: text tokenizer (`encode` prepends BOS).
        messages: optional leading system message, then user/assistant turns
            ending with a user turn; only user turns may carry media.
        layout: frame delimiter layout (`vision_layout.FrameLayout`).

    Returns:
        The unpadded row: ids and vision_mask.

    Raises:
        TemplateError: no user message, misplaced system message, media on a
            non-user message, last message not from the user, unknown role.
    """
    msgs = list(messages)
    system = DEFAULT_SYSTEM
    if msgs and msgs[0].role == "system":
        system = msgs.pop(0).content
    if not msgs:
        raise TemplateError("a chat prompt needs at least one user message")
    if msgs[-1].role != "user":
        raise TemplateError(f"the last message must be from the user, got {msgs[-1].role!r}")
    builder = _Builder(tokenizer, layout)
    prefix = f"<s>{system} "
    for index, msg in enumerate(msgs):
        if msg.role == "system":
            raise TemplateError(f"a system message is only allowed first (found at position {index})")
        if msg.media and msg.role != "user":
            raise TemplateError(f"only user messages may carry images or video (message {index} is {msg.role!r})")
        if msg.role == "user":
            builder.text(f"{prefix}USER: {msg.content}\n")
            for frame_codes in msg.media:
                builder.vision(frame_codes)
        elif msg.role == "assistant":
            if prefix:  # a conversation opening with an assistant turn still gets the header
                builder.text(prefix.rstrip(" "))
            builder.text(f"{ASSISTANT_TAIL} {msg.content}</s>")
        else:
            raise TemplateError(f"unknown role {msg.role!r}")
        prefix = ""
    builder.text(ASSISTANT_TAIL)
    return builder.build()


def completion_prompt(tokenizer: Encoder, text: str) -> PromptTokens:
    """A raw text prompt (completions API): one encode call, BOS first."""
    return _single(tokenizer, text)


def image_generation_prompt(tokenizer: Encoder, prompt: str) -> PromptTokens:
    """Conditional prompt for text-to-image (vision_mask all False)."""
    return _single(tokenizer, f"<s>{DEFAULT_SYSTEM} USER: Generate an image of {prompt} ASSISTANT: <vision>")


def video_generation_prompt(tokenizer: Encoder, prompt: str) -> PromptTokens:
    """Conditional prompt for text-to-video (vision_mask all False)."""
    return _single(tokenizer, f"<s>{DEFAULT_SYSTEM} USER: Generate a video of {prompt} ASSISTANT: <vision>")


def unconditional_prompt(tokenizer: Encoder) -> PromptTokens:
    """The classifier-free-guidance partner prompt `<s><vision>`."""
    return _single(tokenizer, UNCOND_PROMPT)


def _single(tokenizer: Encoder, text: str) -> PromptTokens:
    ids = tokenizer.encode(text)
    return PromptTokens(ids, [False] * len(ids))


def chat_input_length(max_n_frames: int, block_size: int, min_buffer_size: int = MIN_BUFFER_SIZE) -> int:
    """Row length the reference's vision_chat pads to.

    `ceil((max_n_frames * 257 + min_buffer_size) / block_size) * block_size`.
    """
    if block_size <= 0 or max_n_frames < 0:
        raise TemplateError(f"bad block_size {block_size} or max_n_frames {max_n_frames}")
    raw = vision_layout.num_vision_tokens(max_n_frames) + min_buffer_size
    return int(math.ceil(raw / block_size) * block_size)


def left_pad(
    rows: Sequence[PromptTokens], length: int | None = None, *, truncate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads prompt rows into the reference's batch layout.

    Args:
        rows: unpadded prompts.
        length: row length; None = the longest row.
        truncate: drop tokens from the LEFT of rows longer than `length` (the
            reference's generation tokenizer truncates on the left); when
            False such a row is an error.

    Returns:
        (input_ids int32 [B, L], vision_mask bool [B, L], attention_mask int32 [B, L]);
        pads are id 0, mask False, attention 0.

    Raises:
        TemplateError: a row longer than `length` without `truncate`, or no rows.
    """
    if not rows:
        raise TemplateError("left_pad needs at least one row")
    if length is None:
        length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD_ID, dtype=np.int32)
    vision_mask = np.zeros((len(rows), length), dtype=bool)
    attention_mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n > length:
            if not truncate:
                raise TemplateError(f"prompt of {n} tokens does not fit in {length}")
            n = length
        if n == 0:
            continue
        ids[i, -n:] = row.ids[len(row) - n :]
        vision_mask[i, -n:] = row.vision_mask[len(row) - n :]
        attention_mask[i, -n:] = 1
    return ids, vision_mask, attention_mask
