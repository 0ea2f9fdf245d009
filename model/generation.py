"""The generation loop: prompt rows in, a stream of sampled tokens out.

Host-side driver over the jitted steps in `steps.py`: left-pads the rows into a
length bucket, prefills the cache chunk by chunk, then alternates
`sample_next` / `decode_step`, yielding each step's tokens so callers can
stream them and stop early (stop strings, client disconnects).

Randomness: each step splits the key as Hugging Face's Flax `generate` does
(`key, next = split(key)`, sample with `key`), with threefry in its
non-partitionable form (jax 0.4.29's default, which the reference used). With
`reference_key(...)` the key chain starts exactly where the reference's does,
so sampled tokens equal the reference's for the same seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lwm_serve.model import sharding as sharding_lib
from lwm_serve.model import steps
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.kv_cache import init_cache
from lwm_serve.model.params import Params, unstack_layers
from lwm_serve.model.sampling import SamplingArrays, SamplingFeatures, SamplingParams

logger = logging.getLogger(__name__)

Head = Literal["text", "vision"]
END_OF_FRAME = 8192
TOKENS_PER_FRAME = 257


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int):
        self.prompt_tokens, self.max_new_tokens, self.max_context = prompt_tokens, max_new_tokens, max_context
        super().__init__(
            f"this model's maximum context length is {max_context} tokens, but the prompt has "
            f"{prompt_tokens} tokens and {max_new_tokens} new tokens were requested "
            f"({prompt_tokens + max_new_tokens} in total)")


@dataclass(frozen=True)
class PromptRow:
    """One prompt: token ids and which of them are vision codes."""

    ids: Sequence[int]
    vision_mask: Sequence[bool] | None = None

    def mask(self) -> list[bool]:
        return list(self.vision_mask) if self.vision_mask is not None else [False] * len(self.ids)


@dataclass
class StepOutput:
    """The tokens sampled at one step, one per output row."""

    index: int                 # 0 for the first new token
    tokens: np.ndarray         # [B'] int32
    logprobs: np.ndarray       # [B'] float32, of the chosen token
    top_logprobs: np.ndarray   # [B', n] float32
    top_ids: np.ndarray        # [B', n] int32
    finished: np.ndarray       # [B'] bool: this token ended the row (stop token)


def reference_chat_key(seed: int) -> jax.Array:
    """The `prng_key` the reference's vision_chat passes to `generate`.

    tux `set_random_seed(seed)` -> `next_rng()` (second half of a split) at
    Sampler init -> `JaxRNG(rng)()` inside the jitted function (second half again).
    """
    with jax.threefry_partitionable(False):
        sharded = jax.random.split(jax.random.PRNGKey(seed))[1]
        return jax.random.split(sharded)[1]


def reference_vision_keys(seed: int, calls: int) -> list[jax.Array]:
    """The `prng_key`s of the reference's vision_generation calls (image, then video)."""
    keys = []
    with jax.threefry_partitionable(False):
        sharded = jax.random.split(jax.random.PRNGKey(seed))[1]
        for _ in range(calls):
            rest, prng_key = jax.random.split(sharded)
            keys.append(prng_key)
            sharded = jax.random.split(rest)[1]
    return keys


def seed_key(seed: int | None) -> jax.Array:
    """This server's per-request key: PRNGKey(seed), or fresh entropy without a seed."""
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
    return jax.random.PRNGKey(seed)


@dataclass
class _Batch:
    tokens: np.ndarray         # [B, P] left padded
    vision_mask: np.ndarray    # [B, P]
    attention_mask: np.ndarray  # [B, P]
    positions: np.ndarray      # [B, P]
    next_position: np.ndarray  # [B]


def left_pad(rows: Sequence[PromptRow], length: int, pad_id: int = 0) -> _Batch:
    """Right-align each row in `length` columns; positions count real tokens only."""
    b = len(rows)
    tokens = np.full((b, length), pad_id, np.int32)
    vmask = np.zeros((b, length), bool)
    amask = np.zeros((b, length), np.int32)
    for i, row in enumerate(rows):
        n = len(row.ids)
        if n:
            tokens[i, -n:] = row.ids
            vmask[i, -n:] = row.mask()
            amask[i, -n:] = 1
    positions = np.maximum(np.cumsum(amask, axis=1) - 1, 0).astype(np.int32)
    return _Batch(tokens, vmask, amask, positions, amask.sum(axis=1).astype(np.int32))


@dataclass
class Generator:
    """Holds the weights and runs generation for a batch of prompt rows.

    Attributes:
      params, cfg: the model (a scanned tree is re-laid per layer for speed,
        see `params.unstack_layers`).
      prefill_chunk: longest prompt piece prefilled in one step; longer prompts
        are prefilled chunk by chunk, each attending to the cache so far.
      max_context: the longest prompt + generation accepted (default: the
        model's max_sequence_length).
      mesh: a ('dp','fsdp','tp','sp') mesh (model/mesh.py): params are placed
        with the partition rules, the cache is sequence-sharded, prefill runs
        RingAttention and decode the sharded decode. None: one device.
    """

    params: Params
    cfg: ModelConfig
    prefill_chunk: int = 2048
    max_context: int | None = None
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        self.params, self.cfg = unstack_layers(self.params, self.cfg)
        if self.mesh is not None:
            sharding_lib.validate(self.cfg, self.mesh)
            self.params = sharding_lib.shard_params(self.params, self.cfg, self.mesh)

    def _init_cache(self, batch_size: int, length: int):
        if self.mesh is None:
            return init_cache(self.cfg, batch_size, length)
        return sharding_lib.init_sharded_cache(self.cfg, batch_size, length, self.mesh)

    @property
    def context_limit(self) -> int:
        return self.max_context or self.cfg.max_sequence_length

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context_limit:
            raise ContextLengthError(prompt_tokens, max_new_tokens, self.context_limit)

    def _prompt_bucket(self, n: int) -> int:
        if n <= self.prefill_chunk:
            return min(steps.bucket_length(n), max(self.prefill_chunk, steps.MIN_BUCKET))
        return int(np.ceil(n / self.prefill_chunk) * self.prefill_chunk)

    def stream(self, rows: Sequence[PromptRow], sampling: SamplingParams | Sequence[SamplingParams],
               *, max_new_tokens: int, key: jax.Array, head: Head = "text",
               uncond_rows: Sequence[PromptRow] | None = None,
               stop_token_ids: Sequence[int] = (), force_frame_delimiters: bool = False,
               top_logprobs: int = 0,
               on_prefill_chunk: Callable[[int, int], None] | None = None) -> Iterator[StepOutput]:
        """Generate up to `max_new_tokens` tokens per row, one step per yield.

        Args:
          rows: the prompts (B' rows).
          sampling: one SamplingParams for all rows or one per row.
          key: the rng key the step chain starts from.
          head: sample text tokens (`lm_head`) or vision codes (`vision_head`).
          uncond_rows: classifier-free guidance: the unconditional prompt per
            row; logits are mixed with each row's `cfg_scale`.
          stop_token_ids: a row is finished after sampling one of these.
          force_frame_delimiters: every 257th vision token is forced to 8192
            (end of frame), as the reference's `_sample_vision`.
          on_prefill_chunk: called with (chunks done, chunks total) during prefill.
        Yields:
          StepOutput per step; the loop ends when every row finished or after
          `max_new_tokens` steps. Closing the generator stops the work.
        """
        n_out = len(rows)
        knobs_list = [sampling] * n_out if isinstance(sampling, SamplingParams) else list(sampling)
        if len(knobs_list) != n_out:
            raise ValueError("one SamplingParams per row is required")
        use_cfg = uncond_rows is not None
        all_rows = list(rows) + (list(uncond_rows) if use_cfg else [])
        if use_cfg and len(uncond_rows) != n_out:
            raise ValueError("uncond_rows must pair with rows")
        longest = max(len(r.ids) for r in all_rows)
        if longest == 0:
            raise ValueError("empty prompt")
        self.check_length(longest, max_new_tokens)

        prompt_len = self._prompt_bucket(longest)
        batch = left_pad(all_rows, prompt_len)
        cache_len = steps.bucket_length(prompt_len + max_new_tokens)
        cache = self._init_cache(len(all_rows), cache_len)
        knobs = SamplingArrays.from_params(knobs_list)
        features = SamplingFeatures.of(knobs_list)
        cfg_scale = jnp.asarray([k.cfg_scale for k in knobs_list], jnp.float32)
        vocab = self.cfg.vocab_size if head == "text" else self.cfg.vision_vocab_size
        counts = jnp.zeros((n_out, vocab), jnp.int32)

        chunk = min(prompt_len, self.prefill_chunk)
        n_chunks = prompt_len // chunk
        logits = None
        for c in range(n_chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            logits, cache = steps.prefill_chunk(
                self.params, self.cfg, jnp.asarray(batch.tokens[:, sl]),
                jnp.asarray(batch.vision_mask[:, sl]), jnp.asarray(batch.attention_mask[:, sl]),
                jnp.asarray(batch.positions[:, sl]), cache, head, self.mesh)
            if on_prefill_chunk is not None:
                on_prefill_chunk(c + 1, n_chunks)

        positions = batch.next_position.copy()
        stop = np.asarray(sorted(set(stop_token_ids)), np.int32)
        finished = np.zeros(n_out, bool)
        for i in range(max_new_tokens):
            with jax.threefry_partitionable(False):
                step_key, key = jax.random.split(key)
                tokens, counts, chosen, top_vals, top_ids = steps.sample_next(
                    step_key, logits, knobs, counts, cfg_scale, use_cfg, top_logprobs, features)
            host_tokens = np.asarray(tokens)
            if force_frame_delimiters and (i + 1) % TOKENS_PER_FRAME == 0:
                host_tokens = np.full_like(host_tokens, END_OF_FRAME)
            now_finished = ~finished & np.isin(host_tokens, stop)
            finished |= now_finished
            yield StepOutput(i, host_tokens, np.asarray(chosen), np.asarray(top_vals)[:, :top_logprobs],
                             np.asarray(top_ids)[:, :top_logprobs], now_finished)
            if finished.all() or i + 1 == max_new_tokens:
                return
            feed = np.concatenate([host_tokens, host_tokens]) if use_cfg else host_tokens
            logits, cache = steps.decode_step(self.params, self.cfg, jnp.asarray(feed),
                                              jnp.asarray(positions), cache, head, self.mesh)
            positions = positions + 1

    def generate(self, rows: Sequence[PromptRow], sampling: SamplingParams | Sequence[SamplingParams],
                 **kwargs) -> list[list[int]]:
        """All new tokens per row (up to and including a stop token)."""
        out: list[list[int]] = [[] for _ in rows]
        done = np.zeros(len(rows), bool)
        for step in self.stream(rows, sampling, **kwargs):
            for r, tok in enumerate(step.tokens):
                if not done[r]:
                    out[r].append(int(tok))
            done |= step.finished
        return out
