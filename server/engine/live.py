"""A request while the engine runs it: its pool rows, key chains and sampling state.

Host-side bookkeeping for model/runner.py's slot pool (no JAX calls but the
sampling step): which pool row holds which output row, each row's key chain,
penalty counts, stop tokens, and how far it got. The worker thread alone
touches these objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.model import steps
from lwm_serve.model.generation import StepOutput, row_keys, seed_key
from lwm_serve.model.runner import PrefillTask
from lwm_serve.model.sampling import SamplingArrays, SamplingFeatures, SamplingParams
from lwm_serve.server.engine.request import GenerationRequest

# A row that only pads a sampling batch: greedy, no filter, no penalty.
_PAD_SAMPLING = SamplingParams(temperature=0.0)


@dataclass(eq=False)
class LiveRequest:
    """One admitted request.

    Output row r of the request decodes in pool row `rows[r]`. Its prompt rows
    are prefilled once per distinct prompt (`tasks`; n choices of one prompt
    share a single prefill).
    """

    entry: Any                     # the engine's queue entry (request, record, delivery)
    request: GenerationRequest
    vocab: int
    rows: list[int] = field(default_factory=list)
    tasks: list[PrefillTask] = field(default_factory=list)
    task_of_row: list[int] = field(default_factory=list)
    keys: np.ndarray | None = None          # [n, 2] uint32
    counts: np.ndarray | None = None        # [n, V] int32, with penalties only
    last: np.ndarray | None = None          # [n] the tokens to feed next
    finished: np.ndarray | None = None      # [n] bool
    stop: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    step: int = 0
    deadline: float | None = None
    last_time: float = 0.0      # when the previous token was handed out

    def __post_init__(self) -> None:
        req = self.request
        n = len(req.rows)
        self.keys = row_keys(seed_key(req.seed), n)
        self.finished = np.zeros(n, bool)
        self.stop = np.asarray(sorted(set(req.stop_token_ids)), np.int32)
        if SamplingFeatures.of(list(req.sampling)).penalties:
            self.counts = np.zeros((n, self.vocab), np.int32)
        if req.timeout_s is not None:
            self.deadline = time.monotonic() + req.timeout_s

    @property
    def n(self) -> int:
        return len(self.request.rows)

    @property
    def prefilled(self) -> bool:
        return all(t.complete for t in self.tasks)

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.step >= self.request.max_new_tokens


def sample(live: Sequence[LiveRequest], logits: jax.Array, row_of: Sequence[Sequence[int]],
           pad_to: int | None = None) -> list[StepOutput]:
    """Samples one token for every output row of `live` and advances their state.

    Args:
      live: the requests sampled together.
      logits: [R, V]; request i's output row r reads logits[row_of[i][r]].
      pad_to: sample over this many rows (padding with greedy dummies), so the
        sampling step compiles once per pool size rather than per mix of requests.
    Returns:
      One StepOutput per request, in order.
    """
    sampling: list[SamplingParams] = []
    take: list[int] = []
    keys, counts = [], []
    penalties = any(r.counts is not None for r in live)
    for req, rows in zip(live, row_of):
        sampling.extend(req.request.sampling)
        take.extend(rows)
        keys.append(req.keys)
        if penalties:
            counts.append(req.counts if req.counts is not None else np.zeros((req.n, req.vocab), np.int32))
    used = len(take)
    width = max(pad_to or used, used)
    sampling += [_PAD_SAMPLING] * (width - used)
    take += [take[0]] * (width - used)
    keys_arr = np.concatenate(keys + [np.zeros((width - used, 2), np.uint32)])
    counts_arr = None
    if penalties:
        counts_arr = np.concatenate(counts + [np.zeros((width - used, live[0].vocab), np.int32)])
    top_n = max(r.request.top_logprobs for r in live)
    if not any(r.request.logprobs or r.request.top_logprobs for r in live):
        top_n = -1
    rows = logits[jnp.asarray(take)] if take != list(range(logits.shape[0])) else logits
    with jax.threefry_partitionable(False):
        tokens, next_keys, chosen, top_vals, top_ids = steps.sample_rows(
            jnp.asarray(keys_arr), rows, SamplingArrays.from_params(sampling),
            None if counts_arr is None else jnp.asarray(counts_arr),
            jnp.ones((width,), jnp.float32), False, top_n, SamplingFeatures.of(sampling))
    tokens, next_keys = np.asarray(tokens), np.asarray(next_keys)
    chosen, top_vals, top_ids = np.asarray(chosen), np.asarray(top_vals), np.asarray(top_ids)
    outputs, at = [], 0
    for req in live:
        sl = slice(at, at + req.n)
        at += req.n
        toks = tokens[sl].astype(np.int32)
        req.keys = next_keys[sl]
        if req.counts is not None:
            req.counts[np.arange(req.n), toks] += 1
        k = req.request.top_logprobs
        now_finished = ~req.finished & np.isin(toks, req.stop)
        req.finished |= now_finished
        outputs.append(StepOutput(req.step, toks, chosen[sl], top_vals[sl, :k], top_ids[sl, :k], now_finished))
        req.last = toks
        req.step += 1
    return outputs
