"""How many prompt tokens one prefill step takes, per model and mesh.

A chunk too small wastes the matmul units (each weight is streamed once per
chunk, and small matmuls run below the roof); a chunk too large makes every
decoding stream wait for it (the engine interleaves one prefill chunk between
decode steps). Measured on the CPU host (bench/prefill_profile.py, bench-150m,
fp32, CPU seconds against the matmul roof in the same run):

* the projections and MLP reach the roof at 512 tokens per step per device
  and gain nothing beyond (the roof-share of the non-attention part is the same
  for chunks of 512, 2048 and 8192 within the run-to-run noise);
* attention costs the same per token whatever the chunk: the tiled kernel
  (model/attention.py) computes the same visible tiles whether the prompt
  arrives in one piece or in many, reading the earlier chunks from the cache
  in place (no copy per chunk);
* the host's share per chunk (dispatch, the last-position head) is ~ms, under
  1% of a 512-token step.

So the rule: the smallest chunk that fills the matmuls (`saturation_tokens`
rows per device), capped so that one chunk's work stays under the
engine's bound on how long a decoding stream may wait.
"""

from __future__ import annotations

from typing import Mapping

from lwm_serve.model.config import ModelConfig

# Matmul rows per device (tokens summed over the batch) at which the non-attention matmuls reach their
# plateau, measured on the CPU host (see the module docstring). Accelerators
# with systolic arrays need more rows per matmul; measure with
# bench/prefill_profile.py and pass the table to `saturation_from_measurements`.
CPU_SATURATION_TOKENS = 512
_UNIT = 128  # attention tile granularity (attention.choose_tiles never goes below it)


def prefill_flops(cfg: ModelConfig, tokens: int, past: int = 0) -> float:
    """Matmul FLOPs of prefilling `tokens` after `past` cached ones (causal: the
    visible half of the new x new block plus new x past)."""
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_heads * cfg.head_dim
    per_token = 2 * cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * m)
    pairs = tokens * tokens / 2 + tokens * past
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * pairs
    return per_token * tokens + attention


def saturation_from_measurements(seconds_per_token: Mapping[int, float], tolerance: float = 0.05) -> int:
    """The smallest measured chunk whose cost per token is within `tolerance` of the best.

    Args:
      seconds_per_token: chunk size (tokens per device and row) -> measured
        seconds per token of the non-attention part (bench/prefill_profile.py's
        `rest` column divided by the tokens), all from one run.
    """
    if not seconds_per_token:
        raise ValueError("no measurements")
    best = min(seconds_per_token.values())
    return min(c for c, s in seconds_per_token.items() if s <= best * (1 + tolerance))


def choose_prefill_chunk(cfg: ModelConfig, sp: int = 1, *, batch: int = 1,
                         saturation_tokens: int = CPU_SATURATION_TOKENS,
                         max_wait_s: float | None = None, flops_per_s: float | None = None,
                         context: int | None = None) -> int:
    """Prompt tokens per prefill step for this model on a mesh with `sp` sequence shards.

    Args:
      cfg: the model.
      sp: the mesh's sequence-parallel size (each device gets chunk / sp tokens).
      batch: rows prefilled together (each row adds its tokens to the matmuls'
        rows, so the saturating chunk per row shrinks with the batch).
      saturation_tokens: matmul rows per device (tokens summed over the batch)
        at which the matmuls reach the roof
        (`CPU_SATURATION_TOKENS`, or `saturation_from_measurements`).
      max_wait_s, flops_per_s: the engine's bound on a decoding stream's wait and
        the device's measured matmul FLOP/s (per device); with both, the chunk
        is the largest whose work at position `context` stays under the bound,
        if that is smaller than the saturating chunk (latency wins).
      context: the longest context served (the last chunk is the costliest:
        it attends over everything before it); default the model's maximum.
    Returns:
      A multiple of sp * 128 (whole tiles on every device), at least sp * 128.
    """
    unit = sp * _UNIT
    per_row = max(_UNIT, -(-saturation_tokens // max(1, batch)))
    chunk = -(-per_row * sp // unit) * unit
    if max_wait_s is not None and flops_per_s is not None:
        context = context or cfg.max_sequence_length
        budget = max_wait_s * flops_per_s * sp
        while chunk > unit and batch * prefill_flops(cfg, chunk, max(0, context - chunk)) > budget:
            chunk -= unit
    return chunk
