"""The generation loop: prompt rows in, a stream of sampled tokens out.

The library's one-request convenience, on the same machinery as the serving
engine (model/runner.py): each prompt row is prefilled chunk by chunk into its
own scratch cache and copied into a small slot pool, then `sample_rows` /
`SlotPool.decode` alternate, yielding each step's tokens so callers can stream
them and stop early (stop strings, client disconnects).

Randomness: each output row has its own key chain (the request's key for one
row, `split(key, n)` for n rows), split every step as Hugging Face's Flax
`generate` does (`key, next = split(key)`, sample with `key`), with threefry in
its non-partitionable form (jax 0.4.29's default, which the reference used).
With `reference_chat_key(...)` the chain starts exactly where the reference's
does, so sampled tokens equal the reference's for the same seed; and a row's
tokens never depend on the other rows it is batched with.
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
from lwm_serve.model.params import Params, unstack_layers
from lwm_serve.model.runner import SlotPool, pool_slots
from lwm_serve.model.sampling import SamplingArrays, SamplingFeatures, SamplingParams

logger = logging.getLogger(__name__)

Head = Literal["text", "vision"]
# Step index (0 = first new token) -> a token to emit instead of sampling, or None.
ForcedTokens = Callable[[int], "int | None"]


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


def row_keys(key: jax.Array, rows: int) -> np.ndarray:
    """[rows, 2] key chains of a request's output rows: its key for one row, split for more."""
    with jax.threefry_partitionable(False):
        keys = key[None] if rows == 1 else jax.random.split(key, rows)
    return np.asarray(keys)


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

    @property
    def context_limit(self) -> int:
        return self.max_context or self.cfg.max_sequence_length

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context_limit:
            raise ContextLengthError(prompt_tokens, max_new_tokens, self.context_limit)

    def stream(self, rows: Sequence[PromptRow], sampling: SamplingParams | Sequence[SamplingParams],
               *, max_new_tokens: int, key: jax.Array, head: Head = "text",
               uncond_rows: Sequence[PromptRow] | None = None,
               stop_token_ids: Sequence[int] = (), forced_tokens: ForcedTokens | None = None,
               top_logprobs: int = 0,
               on_prefill_chunk: Callable[[int, int], None] | None = None) -> Iterator[StepOutput]:
        """Generate up to `max_new_tokens` tokens per row, one step per yield.

        Args:
          rows: the prompts (B' rows).
          sampling: one SamplingParams for all rows or one per row.
          key: the rng key the step chains start from (see `row_keys`).
          head: sample text tokens (`lm_head`) or vision codes (`vision_head`).
          uncond_rows: classifier-free guidance: the unconditional prompt per
            row; logits are mixed with each row's `cfg_scale`.
          stop_token_ids: a row is finished after sampling one of these.
          forced_tokens: steps whose token is dictated rather than sampled (the
            vision layout's frame delimiters, as the reference's `_sample_vision`).
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

        pool = SlotPool(self.params, self.cfg, num_slots=len(all_rows), mesh=self.mesh,
                        prefill_chunk=self.prefill_chunk,
                        max_length=steps.bucket_length(
                            max(pool_slots(len(r.ids), self.prefill_chunk) for r in all_rows)
                            + max_new_tokens))
        tasks = [pool.start_prefill(r.ids, r.mask(), head, reuse=False) for r in all_rows]
        total, done = sum(t.chunks_total for t in tasks), 0
        for row, task in enumerate(tasks):
            while not task.complete:
                pool.prefill_step(task)
                done += 1
                if on_prefill_chunk is not None:
                    on_prefill_chunk(done, total)
            pool.insert(task, row)
        logits = jnp.concatenate([t.logits for t in tasks], axis=0)
        del tasks

        knobs = SamplingArrays.from_params(knobs_list)
        features = SamplingFeatures.of(knobs_list)
        cfg_scale = jnp.asarray([k.cfg_scale for k in knobs_list], jnp.float32)
        vocab = self.cfg.vocab_size if head == "text" else self.cfg.vision_vocab_size
        counts = np.zeros((n_out, vocab), np.int32) if features.penalties else None
        keys = jnp.asarray(row_keys(key, n_out))
        stop = np.asarray(sorted(set(stop_token_ids)), np.int32)
        finished = np.zeros(n_out, bool)
        for i in range(max_new_tokens):
            with jax.threefry_partitionable(False):
                tokens, keys, chosen, top_vals, top_ids = steps.sample_rows(
                    keys, logits, knobs, None if counts is None else jnp.asarray(counts), cfg_scale,
                    use_cfg, top_logprobs, features)
            host_tokens = np.asarray(tokens)
            if counts is not None:
                counts[np.arange(n_out), host_tokens] += 1
            forced = forced_tokens(i) if forced_tokens is not None else None
            if forced is not None:
                host_tokens = np.full_like(host_tokens, forced)
            now_finished = ~finished & np.isin(host_tokens, stop)
            finished |= now_finished
            yield StepOutput(i, host_tokens, np.asarray(chosen), np.asarray(top_vals)[:, :top_logprobs],
                             np.asarray(top_ids)[:, :top_logprobs], now_finished)
            if finished.all() or i + 1 == max_new_tokens:
                return
            feed = np.concatenate([host_tokens, host_tokens]) if use_cfg else host_tokens
            logits = pool.decode({r: int(t) for r, t in enumerate(feed)}, head)

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
