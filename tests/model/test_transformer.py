"""The decoder against the reference's own outputs (forward cases of every reference set)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lwm_serve.model import transformer
from lwm_serve.model.kv_cache import init_cache

FP32_TOL = 1e-5


def _run(case_dir, params, cfg, dtype: str = "float32"):
    d = dict(np.load(case_dir / "data.npz"))
    cfg = cfg.replace(dtype=dtype)
    out = transformer.forward(
        params, cfg, jnp.asarray(d["input_ids"]), jnp.asarray(d["vision_masks"]),
        jnp.asarray(d["position_ids"]), attention_mask=jnp.asarray(d["attention_mask"]),
        segment_ids=jnp.asarray(d["segment_ids"]), output_hidden_states=True)
    return d, out


def _compare(d: dict, out: transformer.Output, tol: float) -> dict[str, float]:
    """Max |ours - reference| for every expected array the case has."""
    text, vision = np.asarray(out.text_logits), np.asarray(out.vision_logits)
    hidden = np.stack([np.asarray(h) for h in out.hidden_states])
    valid = d["attention_mask"].astype(bool)
    diffs = {}
    if "text_logits" in d:
        diffs["text"] = np.abs(text[valid] - d["text_logits"][valid]).max()
    if "vision_logits" in d:
        diffs["vision"] = np.abs(vision[valid] - d["vision_logits"][valid]).max()
    if "vision_logits_last" in d:
        diffs["vision_last"] = np.abs(vision[:, -1] - d["vision_logits_last"]).max()
    if "hidden_states" in d:
        diffs["hidden"] = np.abs(hidden[:, valid] - d["hidden_states"][:, valid]).max()
    if "valid_positions" in d:  # single-row case stored at valid positions only
        vp = d["valid_positions"]
        diffs["text"] = np.abs(text[0, vp] - d["text_logits_valid"]).max()
        diffs["hidden"] = np.abs(hidden[:, 0, vp] - d["hidden_states_valid"]).max()
        diffs["final_hidden"] = np.abs(hidden[-1, 0, vp] - d["final_hidden_valid"]).max()
        pos = d["vision_logits_positions"]
        diffs["vision"] = np.abs(vision[0, pos] - d["vision_logits_at_positions"]).max()
    assert diffs, "case has no expected arrays this test knows"
    return diffs


def test_forward_matches_reference(forward_case, reference_params, reference_config):
    case_dir, params_name, scan = forward_case
    d, out = _run(case_dir, reference_params(params_name), reference_config(scan))
    diffs = _compare(d, out, FP32_TOL)
    assert max(diffs.values()) < FP32_TOL, diffs


def test_bf16_compute_deviation_is_bounded(reference_set):
    """bf16 matmuls against the fp32 path: measured, and bounded relative to the logit scale."""
    rs = reference_set
    case_dir = next(d for d, f in rs.forward_runs()
                    if f == rs.primary and "text_logits" in rs.load_case(d)[1])
    params, cfg = rs.params(rs.primary), rs.file_config(rs.primary)
    d, ref = _run(case_dir, params, cfg, "float32")
    _, bf = _run(case_dir, rs.params(rs.primary, "bfloat16"), cfg.replace(param_dtype="bfloat16"),
                 "bfloat16")
    valid = d["attention_mask"].astype(bool)
    for name in ("text_logits", "vision_logits"):
        a = np.asarray(getattr(ref, name))[valid]
        b = np.asarray(getattr(bf, name))[valid]
        assert np.isfinite(b).all()
        rel = np.abs(a - b).max() / np.abs(a).max()
        # bf16 has an 8-bit mantissa (~0.4% per rounding). Measured on this
        # model: 0.56% (text) and 0.72% (vision) of the largest |logit|.
        assert rel < 0.02, (name, rel)
        assert rel > 0, "bf16 path produced fp32-identical logits: it did not run in bf16"


def test_prefill_then_decode_matches_full_forward(public_set):
    """Cached prefill + token-by-token decode == one full causal forward (a model
    self-consistency check: one set is enough)."""
    cfg = public_set.file_config(public_set.primary)
    params = public_set.params(public_set.primary)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(2, 24)).astype(np.int32)
    attn = np.ones_like(tokens)
    attn[1, :5] = 0  # left padding on row 1
    positions = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    vmask = np.zeros(tokens.shape, bool)
    full = transformer.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(vmask),
                               jnp.asarray(positions), attention_mask=jnp.asarray(attn))
    cache = init_cache(cfg, 2, 64)
    split = 16
    out = transformer.forward(params, cfg, jnp.asarray(tokens[:, :split]), jnp.asarray(vmask[:, :split]),
                              jnp.asarray(positions[:, :split]), attention_mask=jnp.asarray(attn[:, :split]),
                              cache=cache)
    cache = out.cache
    got = [np.asarray(out.text_logits)]
    for t in range(split, tokens.shape[1]):
        out = transformer.forward(params, cfg, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(vmask[:, t:t + 1]),
                                  jnp.asarray(positions[:, t:t + 1]), cache=cache)
        cache = out.cache
        got.append(np.asarray(out.text_logits))
    got = np.concatenate(got, axis=1)
    want = np.asarray(full.text_logits)
    valid = attn.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=FP32_TOL, rtol=0)
    assert int(cache.index[0]) == tokens.shape[1]


def test_per_layer_and_scanned_layouts_agree(reference_set):
    scan, per_layer = reference_set.fp32_file(True), reference_set.fp32_file(False)
    assert scan and per_layer, "the manifest lists an fp32 file of each layout"
    tokens = jnp.arange(3, 40, dtype=jnp.int32)[None]
    vmask = jnp.zeros(tokens.shape, bool)
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    a = transformer.forward(reference_set.params(scan), reference_set.file_config(scan), tokens, vmask, pos)
    b = transformer.forward(reference_set.params(per_layer), reference_set.file_config(per_layer),
                            tokens, vmask, pos)
    np.testing.assert_allclose(np.asarray(a.text_logits), np.asarray(b.text_logits), atol=FP32_TOL)


def test_param_scan_axis_one_equals_axis_zero(reference_set):
    """The reference's two param_scan_axis layouts (layer axis first or second) give the same model."""
    import jax

    scan = reference_set.fp32_file(True)
    cfg0 = reference_set.file_config(scan)
    params0 = reference_set.params(scan)
    stacked = params0["transformer"]["h"]["scan_decoder"]
    axis = cfg0.param_scan_axis
    moved = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, axis, 1 - axis), stacked)
    params1 = {**params0, "transformer": {**params0["transformer"], "h": {"scan_decoder": moved}}}
    cfg1 = cfg0.replace(param_scan_axis=1 - axis)
    tokens = jnp.arange(3, 20, dtype=jnp.int32)[None]
    vmask = jnp.zeros(tokens.shape, bool)
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    a = transformer.forward(params0, cfg0, tokens, vmask, pos)
    b = transformer.forward(params1, cfg1, tokens, vmask, pos)
    np.testing.assert_array_equal(np.asarray(a.text_logits), np.asarray(b.text_logits))
