"""model/chunking.py: the prefill chunk size per model and mesh."""

from __future__ import annotations

import pytest

from lwm_serve.model import chunking
from lwm_serve.model.config import from_preset

CFG = from_preset("bench-150m")


def test_prefill_flops_counts_the_causal_half_and_the_past():
    h, layers = CFG.hidden_size, CFG.num_hidden_layers
    alone = chunking.prefill_flops(CFG, 1024)
    after = chunking.prefill_flops(CFG, 1024, past=4096)
    assert after - alone == pytest.approx(2 * 2 * layers * h * 1024 * 4096)
    assert chunking.prefill_flops(CFG, 2048) > 2 * alone  # attention grows faster than linearly


@pytest.mark.parametrize("sp", [1, 2, 8])
def test_chunk_fills_the_matmuls_and_whole_tiles_on_every_device(sp):
    chunk = chunking.choose_prefill_chunk(CFG, sp)
    assert chunk % (sp * 128) == 0
    assert chunk // sp >= chunking.CPU_SATURATION_TOKENS


def test_batch_shares_the_saturating_rows():
    one = chunking.choose_prefill_chunk(CFG, batch=1, saturation_tokens=2048)
    four = chunking.choose_prefill_chunk(CFG, batch=4, saturation_tokens=2048)
    assert (one, four) == (2048, 512)


def test_wait_bound_caps_the_chunk():
    free = chunking.choose_prefill_chunk(CFG, saturation_tokens=8192)
    flops_per_s, wait = 1e11, 5.0
    capped = chunking.choose_prefill_chunk(CFG, saturation_tokens=8192, max_wait_s=wait,
                                           flops_per_s=flops_per_s, context=32768)
    assert 128 < capped < free
    # the largest multiple of 128 whose last chunk (after 32768 - chunk tokens) fits the wait
    assert chunking.prefill_flops(CFG, capped, 32768 - capped) <= wait * flops_per_s
    assert chunking.prefill_flops(CFG, capped + 128, 32768 - capped - 128) > wait * flops_per_s
    # a bound no chunk meets: the smallest whole-tile chunk, never zero
    assert chunking.choose_prefill_chunk(CFG, 4, max_wait_s=1e-6, flops_per_s=flops_per_s) == 4 * 128


def test_saturation_from_measurements_picks_the_smallest_near_best():
    table = {128: 3.0e-3, 256: 2.0e-3, 512: 1.02e-3, 2048: 1.0e-3, 8192: 1.01e-3}
    assert chunking.saturation_from_measurements(table) == 512
    with pytest.raises(ValueError):
        chunking.saturation_from_measurements({})
