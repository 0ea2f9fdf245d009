"""A fast held-out check of LWM-Nano during training: teacher-forced answer accuracy.

Each held-out question is built as the server builds a first (and only) question
about a medium, followed by its true reply. One forward pass over it tells whether
greedy decoding would give that reply: every token of the reply that decides the
answer (`data.decisive_tokens`) must be the model's top text token where it stands.
Seconds per check instead of minutes through the API (`bench/nano_eval.py`, which
remains the measure of record), so training can log how each question type grows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.model import transformer
from lwm_serve.model.config import ModelConfig
from lwm_serve.nano import data as nd
from lwm_serve.nano import questions as nq
from lwm_serve.nano import vqgan_fit as vf
from lwm_serve.nano import world
from lwm_serve.tokenizers.media_decode import decode_media

_MARK = 2.0  # answer weight used to find the decisive targets again


@dataclasses.dataclass
class Probe:
    """Held-out single-question sequences, grouped into padded batches by length."""

    batches: list[tuple[nd.Batch, list[str], np.ndarray]]  # (batch, kind per row, decisive [B, T])

    @property
    def size(self) -> int:
        return sum(len(kinds) for _, kinds, _ in self.batches)


def _frames(scene: world.Scene, kind: str) -> np.ndarray:
    data = world.video_mp4(scene) if kind == "video" else world.image_png(scene)
    return np.stack([f for _, f in decode_media(data)])


def build(tok, vq_params, videos: int, images: int, layout: str = "standard", seed_offset: int = 0,
          tokens_per_batch: int = 8192, detail: bool = False, **scene_shape: int) -> Probe:
    """Every question of `videos` held-out videos and `images` held-out images, one per sequence.

    `detail` labels each question `kind/medium/objects` (e.g. `color/video/2`) instead of its kind;
    `scene_shape` (num_objects, num_frames) fixes the held-out videos' shape.
    """
    rows: list[tuple[nd.Sequence_, str]] = []
    for kind, count in (("video", videos), ("image", images)):
        for i in range(count):
            scene = world.scene_from_seed(world.HELD_OUT_SEED_BASE + 500_000 + seed_offset + i, kind,
                                          **(scene_shape if kind == "video" else {}))
            codes = vf.fast_codes(vq_params, _frames(scene, kind), batch=8).reshape(scene.num_frames, -1)
            for qa in nq.questions_for(scene, kind):
                label = f"{qa.kind}/{kind}/{len(scene.objects)}" if detail else qa.kind
                rows.append((nd.qa_sequence(tok, codes, [qa], layout, kind, _MARK), label))
    rows.sort(key=lambda r: len(r[0]))
    batches = []
    i = 0
    while i < len(rows):
        length = -(-len(rows[i][0]) // 64) * 64
        n = max(1, tokens_per_batch // length)
        group = rows[i: i + n]
        length = -(-max(len(s) for s, _ in group) // 64) * 64
        batch = nd.make_batch([s for s, _ in group], length)
        batches.append((batch, [k for _, k in group], batch.weight == _MARK))
        i += n
    return Probe(batches)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _text_argmax(params, cfg: ModelConfig, batch: dict[str, jax.Array], attention_fn) -> jax.Array:
    out = transformer.forward(params, cfg, batch["ids"], batch["vision"], batch["positions"],
                              attention_mask=batch["valid"], heads=(), output_hidden_states=True,
                              attention_fn=attention_fn)
    return jnp.argmax(out.hidden_states[-1] @ params["lm_head"]["kernel"], axis=-1)


def accuracy(params, cfg: ModelConfig, probe: Probe, attention_fn) -> dict[str, Any]:
    """{kind: share right, ..., "all": share right, "n": {kind: count}}."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for batch, kinds, decisive in probe.batches:
        arrays = {k: jnp.asarray(getattr(batch, k)) for k in ("ids", "vision", "positions", "valid")}
        top = np.asarray(_text_argmax(params, cfg, arrays, attention_fn))
        ok = np.where(decisive, top == batch.target, True).all(axis=1)
        for kind, good in zip(kinds, ok):
            total[kind] += 1
            right[kind] += int(good)
    result: dict[str, Any] = {k: right[k] / total[k] for k in sorted(total)}
    result["all"] = sum(right.values()) / max(1, sum(total.values()))
    result["n"] = dict(total)
    return result


def next_code_by_frame(params, cfg: ModelConfig, tok, vq_params, attention_fn, videos: int = 20,
                       num_frames: int = 4, seed_offset: int = 0) -> dict[tuple[str, int], float]:
    """Top-1 next-code accuracy on the object codes of held-out one-object videos, per frame.

    {("still" | "moving", frame index): share right}. A still object's codes repeat
    from frame to frame (the VQGAN gives a patch the same code whatever else the frame
    holds), so a model that reads the frame before predicts frames 2.. of a still object
    nearly perfectly, and better than frame 1; equal shares mean it does not look back,
    which is what motion needs (`train_lm.pin_offset_heads`).
    """
    right: dict[tuple[str, int], int] = defaultdict(int)
    total: dict[tuple[str, int], int] = defaultdict(int)
    kernel = params["vision_head"]["kernel"][:, : vf.NUM_USED]
    for i in range(videos):
        scene = world.scene_from_seed(world.HELD_OUT_SEED_BASE + 700_000 + seed_offset + i, "video",
                                      num_frames=num_frames, num_objects=1)
        codes = vf.fast_codes(vq_params, _frames(scene, "video"), batch=8).reshape(num_frames, -1)
        seq = nd.qa_sequence(tok, codes, nq.questions_for(scene, "video")[:1], "standard", "video")
        batch = nd.make_batch([seq], len(seq))
        out = transformer.forward(params, cfg, jnp.asarray(batch.ids), jnp.asarray(batch.vision),
                                  jnp.asarray(batch.positions), attention_mask=jnp.asarray(batch.valid),
                                  heads=(), output_hidden_states=True, attention_fn=attention_fn)
        top = np.asarray(jnp.argmax(out.hidden_states[-1][0] @ kernel, axis=-1))
        target = batch.target[0]
        # The frames' codes are the vision targets below NUM_USED, frame after frame.
        where = np.flatnonzero(batch.target_vision[0] & (target >= 0) & (target < vf.NUM_USED))
        where = where[: codes.size].reshape(num_frames, -1)
        if not np.array_equal(target[where], codes):
            raise AssertionError("the vision targets are not the video's codes in order")
        background = nd.background_code(codes)
        motion = "still" if scene.objects[0].direction == "still" else "moving"
        for f in range(num_frames):
            on_object = where[f][target[where[f]] != background]
            right[(motion, f)] += int(np.sum(top[on_object] == target[on_object]))
            total[(motion, f)] += len(on_object)
    return {k: right[k] / total[k] for k in sorted(total) if total[k]}
