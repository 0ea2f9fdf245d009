"""Training sequences for LWM-Nano, built with the server's own prompt code.

Every sequence starts exactly as the server's prompt for its first request
(`chat_template.build_chat`, `image_generation_prompt`, `unconditional_prompt`),
so what the model learns to continue is byte for byte what it will be asked.

A video or image carries several questions in one sequence, each a further
turn (`USER: q` then ` ASSISTANT:` as the template writes them, the answer, EOS):
the long vision prefix is paid once for all of its questions. The first turn is
the served single-question prompt exactly; later turns differ from the served
multi-turn history only in that the earlier answers end with the EOS id rather
than the template's literal `</s>` text.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lwm_serve.nano import questions as nq
from lwm_serve.tokenizers import chat_template as ct
from lwm_serve.tokenizers import vision_layout as vl

IGNORE = -1  # target of a position that is not trained


@dataclasses.dataclass
class Sequence_:
    ids: np.ndarray  # [T] int32
    vision: np.ndarray  # [T] bool: the id indexes the vision vocabulary
    target: np.ndarray  # [T] int32: the next id to predict, or IGNORE
    kind: str  # "video-<F>", "image", "draw", "chat"
    weight: np.ndarray | None = None  # [T] float32: loss weight of each target (None: all 1)

    def __len__(self) -> int:
        return len(self.ids)


def _seq(ids: list[int], vision: list[bool], trained: list[bool], kind: str,
         weights: list[float] | None = None) -> Sequence_:
    ids_a = np.asarray(ids, np.int32)
    target = np.full(len(ids), IGNORE, np.int32)
    train_next = np.asarray(trained[1:], bool)
    target[:-1][train_next] = ids_a[1:][train_next]
    weight = np.ones(len(ids), np.float32)
    if weights is not None:
        weight[:-1] = np.asarray(weights[1:], np.float32)  # a target's weight is its token's
    return Sequence_(ids_a, np.asarray(vision, bool), target, kind, weight)


class _Writer:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.vision: list[bool] = []
        self.trained: list[bool] = []
        self.weights: list[float] = []

    def add(self, ids: Sequence[int], vision: Sequence[bool] | bool = False,
            trained: Sequence[bool] | bool = False, weights: Sequence[float] | None = None) -> None:
        self.weights += [1.0] * len(ids) if weights is None else list(weights)
        self.ids += list(ids)
        self.vision += [vision] * len(ids) if isinstance(vision, bool) else list(vision)
        self.trained += [trained] * len(ids) if isinstance(trained, bool) else list(trained)


def decisive_tokens(tok, kind: str, reply: str) -> np.ndarray:
    """[len(reply ids)] bool: the reply's tokens from where the replies of its kind part ways.

    "It is moving left." and "It is standing still." share "It is"; "moving" and
    "standing" already decide the answer, so the decisive tokens start there (and run to
    the end, the answer word and its full stop), not only at the answer word.
    """
    ids = tok.encode(reply, add_bos=False)
    others = [tok.encode(nq.reply_for(kind, w), add_bos=False) for w in nq.ANSWER_WORDS[kind]]
    common = min(next((i for i, (a, b) in enumerate(zip(ids, o)) if a != b), min(len(ids), len(o)))
                 for o in others if o != ids)
    return np.arange(len(ids)) >= common


def _answer(tok, writer: _Writer, reply: str, kind: str | None = None, answer_weight: float = 1.0) -> None:
    ids = tok.encode(reply, add_bos=False)
    weights = np.ones(len(ids) + 1)
    if kind is not None:
        weights[:-1][decisive_tokens(tok, kind, reply)] = answer_weight
    writer.add(ids + [tok.eos_id], trained=True, weights=weights)


def background_code(codes: np.ndarray) -> int:
    """The commonest code of a medium: its black background's (objects cover less than half)."""
    return int(np.bincount(np.asarray(codes).ravel()).argmax())


def qa_sequence(tok, codes: np.ndarray, qas: Sequence[nq.QA], layout: vl.FrameLayout, kind: str,
                answer_weight: float = 1.0, code_weight: np.ndarray | None = None) -> Sequence_:
    """A video/image (codes [F, 256]) with its questions as successive turns.

    The vision tokens are trained too (next code, as LWM is trained): thousands of
    targets per video that teach what moves where, next to a handful of answer words.
    The reply tokens that decide the answer (`decisive_tokens`) weigh `answer_weight`
    in the loss, the rest of the template 1: the template is learnt in a few steps,
    the answer is the signal. `code_weight` ([F, 256], optional) weighs each code's
    next-code target.
    """
    w = _Writer()
    first = ct.build_chat(tok, [ct.Message("user", qas[0].question, (codes,))], layout=layout)
    weights = None
    if code_weight is not None:
        ids = np.asarray(first.ids)
        is_code = np.asarray(first.vision_mask, bool) & (ids < vl.END_OF_FRAME)
        weights = np.ones(len(ids), np.float32)
        weights[is_code] = np.asarray(code_weight, np.float32).reshape(-1)
    w.add(first.ids, first.vision_mask, trained=first.vision_mask, weights=weights)
    _answer(tok, w, qas[0].reply, qas[0].kind, answer_weight)
    for qa in qas[1:]:
        w.add(tok.encode(f"USER: {qa.question}\n"))
        w.add(tok.encode(ct.ASSISTANT_TAIL))
        _answer(tok, w, qa.reply, qa.kind, answer_weight)
    return _seq(w.ids, w.vision, w.trained, kind, w.weights)


def draw_sequence(tok, codes: np.ndarray, prompt: str | None) -> Sequence_:
    """Image generation: the prompt (None: the CFG partner `<s><vision>`), then 256 trained codes."""
    head = ct.unconditional_prompt(tok) if prompt is None else ct.image_generation_prompt(tok, prompt)
    w = _Writer()
    w.add(head.ids)
    w.add([int(c) for c in np.asarray(codes).reshape(-1)], vision=True, trained=True)
    w.add([vl.END_OF_FRAME], vision=True)  # forced by the sampler, not trained
    return _seq(w.ids, w.vision, w.trained, "draw")


def chat_sequence(tok, question: str, reply: str) -> Sequence_:
    w = _Writer()
    first = ct.build_chat(tok, [ct.Message("user", question)])
    w.add(first.ids)
    _answer(tok, w, reply)
    return _seq(w.ids, w.vision, w.trained, "chat")


@dataclasses.dataclass
class Batch:
    ids: np.ndarray  # [B, T]
    vision: np.ndarray
    target: np.ndarray
    target_vision: np.ndarray  # [B, T] the target indexes the vision vocabulary
    valid: np.ndarray  # [B, T] int32
    positions: np.ndarray  # [B, T] int32
    weight: np.ndarray  # [B, T] float32: each target's loss weight


def make_batch(seqs: Sequence[Sequence_], length: int) -> Batch:
    """Right-padded batch of `length` tokens (padding is masked and never trained)."""
    b = len(seqs)
    ids = np.zeros((b, length), np.int32)
    vision = np.zeros((b, length), bool)
    target = np.full((b, length), IGNORE, np.int32)
    tvis = np.zeros((b, length), bool)
    valid = np.zeros((b, length), np.int32)
    weight = np.ones((b, length), np.float32)
    for i, s in enumerate(seqs):
        n = len(s)
        if n > length:
            raise ValueError(f"sequence of {n} tokens does not fit {length}")
        ids[i, :n], vision[i, :n], target[i, :n], valid[i, :n] = s.ids, s.vision, s.target, 1
        tvis[i, : n - 1] = s.vision[1:]
        if s.weight is not None:
            weight[i, :n] = s.weight
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    return Batch(ids, vision, target, tvis, valid, positions, weight)
