"""LWM-Nano's training parts: the constructed VQGAN encoder, the sequences, the training forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm_serve.model import config as model_config
from lwm_serve.model import transformer
from lwm_serve.nano import data as nd
from lwm_serve.nano import questions as nq
from lwm_serve.nano import train_lm as tl
from lwm_serve.nano import vqgan_fit as vf
from lwm_serve.nano import world
from lwm_serve.tokenizers import chat_template as ct
from lwm_serve.tokenizers import vqgan as vq
from lwm_serve.tokenizers.demo_tokenizer import build_demo_tokenizer
from lwm_serve.tokenizers.media_decode import decode_media
from lwm_serve.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    from lwm_serve.nano.train import CORPUS

    return TextTokenizer(build_demo_tokenizer(tmp_path_factory.mktemp("tok"), corpus=CORPUS))


@pytest.fixture(scope="module")
def world_frames() -> np.ndarray:
    """Frames of a few world videos, through H.264 and the server's decoder."""
    return np.concatenate([np.stack([f for _, f in decode_media(world.video_mp4(world.scene_from_seed(s)))])
                           for s in range(3)])


def test_constructed_encoder_describes_each_patch_by_colour_and_cells(world_frames):
    params = vf.constructed_encoder()
    vq.check_params(params, vf.CONFIG)
    frames = world_frames[:4]
    desc = vf.descriptors(params, frames)  # the reference encoder's own layers
    x = frames.astype(np.float32) / 255
    patch_rgb = x.reshape(4, 16, 16, 16, 16, 3).mean(axis=(2, 4))
    cells = x.mean(-1).reshape(4, 64, 4, 64, 4).mean(axis=(2, 4))
    # Each descriptor channel is an increasing function of its patch statistic.
    for k in range(3):
        assert np.corrcoef(desc[..., k].ravel(), patch_rgb[..., k].ravel())[0, 1] > 0.999
    cell00 = cells.reshape(4, 16, 4, 16, 4)[:, :, 0, :, 0]  # each patch's top-left 4x4 cell
    assert np.corrcoef(desc[..., 3].ravel(), cell00.ravel())[0, 1] > 0.999
    assert np.all(desc[..., vf.NUM_SIGNALS:] == 0)


def test_a_patch_is_described_alike_whatever_else_the_frame_holds(world_frames):
    # The final GroupNorm normalizes by statistics of the whole frame; the constant
    # channels of each group must keep that from moving a patch's descriptor, or one
    # black patch becomes many codes (it was 53) and the model sees flicker everywhere.
    params = vf.constructed_encoder()
    blank = np.zeros((1, 256, 256, 3), np.uint8)
    busy = blank.copy()
    busy[0, 64:192, 64:192] = (255, 255, 0)  # a big yellow square fills a quarter of the frame
    busy[0, 200:240, 10:250] = (0, 0, 255)
    frames = np.concatenate([blank, busy, world_frames[:6]])
    desc = vf.fast_descriptors(params, frames)
    black = frames.reshape(len(frames), 16, 16, 16, 16, 3).max(axis=(2, 4, 5)) == 0
    spread = desc[black][:, : vf.NUM_SIGNALS].std(axis=0).max()
    assert spread < 1e-3, spread
    # and the served encoder agrees
    served = vf.descriptors(params, frames[:2])
    np.testing.assert_allclose(served[0, 0, 0], served[1, 0, 0], atol=1e-3)


def test_fast_codes_equal_the_served_encoder(world_frames):
    params = vf.constructed_encoder()
    pts, counts = vf.unique_descriptors(vf.fast_descriptors(params, world_frames), decimals=2)
    params["quantize"]["embeddings"] = vf.codebook(vf.kmeans(pts, counts, vf.NUM_USED, 3, seed=0))
    frames = world_frames[:8]
    served = np.asarray(vq.encode(params, vf.CONFIG, jnp.asarray(frames.astype(np.float32) / 127.5 - 1))[1])
    fast = vf.fast_codes(params, frames)
    assert (fast == served).mean() >= 0.999
    assert served.max() < vf.NUM_USED  # the parked codes are never chosen


def test_trained_decoder_is_the_reference_decoder():
    params = vf.constructed_encoder()
    params["quantize"]["embeddings"] = vf.codebook(np.random.default_rng(0).normal(size=(vf.NUM_USED, 19)))
    dec = vf.decoder_init(seed=3)
    full = vf.full_params(params, params["quantize"]["embeddings"], dec)
    codes = np.random.default_rng(1).integers(0, vf.NUM_USED, (2, 16, 16))
    served = np.asarray(vq.decode(full, vf.CONFIG, jnp.asarray(codes)))
    trained = np.asarray(jax.jit(vf._train_decoder_forward)(dec, jnp.asarray(full["quantize"]["embeddings"]),
                                                             jnp.asarray(codes)))
    np.testing.assert_allclose(served, trained, atol=1e-5)


def test_question_sequence_starts_with_the_served_prompt(tok):
    scene = world.scene_from_seed(11)
    codes = np.arange(scene.num_frames * 256).reshape(scene.num_frames, 256) % vf.NUM_USED
    qas = nq.questions_for(scene, "video")
    seq = nd.qa_sequence(tok, codes, qas, "standard", "video")
    prompt = ct.build_chat(tok, [ct.Message("user", qas[0].question, (codes,))])
    n = len(prompt.ids)
    assert seq.ids[:n].tolist() == prompt.ids and seq.vision[:n].tolist() == prompt.vision_mask
    answer = tok.encode(qas[0].reply, add_bos=False) + [tok.eos_id]
    assert seq.ids[n : n + len(answer)].tolist() == answer
    # The position before each answer token predicts it; the prompt's text is not trained.
    assert seq.target[n - 1 : n - 1 + len(answer)].tolist() == answer
    text_targets = seq.target[(seq.target != nd.IGNORE) & ~np.r_[seq.vision[1:], False]]
    replies = sum(len(tok.encode(q.reply, add_bos=False)) + 1 for q in qas)
    assert len(text_targets) == replies


def test_the_tokens_that_decide_the_answer_weigh_more(tok):
    # "standing" already tells "still" from "moving ...": the decisive tokens start where
    # the replies of a kind part ways, not only at the answer word.
    still = nq.reply_for("direction", "still")
    pieces = [tok.id_to_piece(i) for i in tok.encode(still, add_bos=False)]
    marked = [p for p, d in zip(pieces, nd.decisive_tokens(tok, "direction", still)) if d]
    assert "".join(marked).replace("\u2581", " ").strip() == "standing still."
    color = nq.reply_for("color", "red")
    assert [tok.id_to_piece(i) for i, d in zip(tok.encode(color, add_bos=False),
                                               nd.decisive_tokens(tok, "color", color)) if d][0] == "\u2581red"

    scene = world.scene_from_seed(5, kind="image")
    qas = nq.questions_for(scene, "image")
    seq = nd.qa_sequence(tok, np.full((1, 256), 3), qas, "standard", "image", answer_weight=5.0)
    text = (seq.target != nd.IGNORE) & ~np.r_[seq.vision[1:], False]
    heavy = seq.weight[text] == 5.0
    assert heavy.sum() == sum(nd.decisive_tokens(tok, q.kind, q.reply).sum() for q in qas)
    assert (seq.weight[text][~heavy] == 1.0).all() and (seq.weight[~text] == 1.0).all()
    # Each heavy target is a decisive token of a reply: the answer word itself is among them.
    assert set(seq.target[text][heavy]) >= {tok.encode(f"It is {q.answer}.", add_bos=False)[2]
                                            for q in qas if q.kind == "color"}


def test_a_heavier_answer_raises_the_loss_by_its_share():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 9)), jnp.float32)
    target = jnp.asarray([[1, 2, 3, nd.IGNORE]])
    use = target != nd.IGNORE
    plain = tl._cross_entropy(logits, target, use)
    weight = jnp.asarray([[1.0, 5.0, 1.0, 1.0]])
    heavy = tl._cross_entropy(logits, target, use, weight)
    logp = jax.nn.log_softmax(logits, -1)[0]
    nll = -np.array([logp[0, 1], logp[1, 2], logp[2, 3]])
    np.testing.assert_allclose(float(plain), nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(heavy), (nll[0] + 5 * nll[1] + nll[2]) / 3, rtol=1e-6)


def test_drawing_sequence_is_the_served_image_prompt_then_codes(tok):
    codes = np.arange(256) + 7
    seq = nd.draw_sequence(tok, codes, nq.image_prompt("red", "circle"))
    prompt = ct.image_generation_prompt(tok, "a red circle.")
    n = len(prompt.ids)
    assert seq.ids[:n].tolist() == prompt.ids
    assert seq.ids[n : n + 256].tolist() == codes.tolist() and seq.vision[n : n + 256].all()
    assert seq.target[n - 1 : n + 255].tolist() == codes.tolist()
    uncond = nd.draw_sequence(tok, codes, None)
    assert uncond.ids[: len(ct.unconditional_prompt(tok).ids)].tolist() == ct.unconditional_prompt(tok).ids


def test_training_forward_is_the_serving_forward():
    cfg = model_config.from_preset("nano").replace(scan_layers=False, num_hidden_layers=2)
    params = tl.init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    t = 600  # three query blocks of the training attention
    ids = rng.integers(0, 500, (2, t))
    vision = rng.random((2, t)) < 0.5
    pos = np.broadcast_to(np.arange(t), (2, t))
    served = transformer.forward(params, cfg, jnp.asarray(ids), jnp.asarray(vision), jnp.asarray(pos))
    trained = transformer.forward(params, cfg, jnp.asarray(ids), jnp.asarray(vision), jnp.asarray(pos),
                                  attention_fn=tl.causal_blocked_attention)
    np.testing.assert_allclose(served.text_logits, trained.text_logits, atol=2e-4)
    np.testing.assert_allclose(served.vision_logits, trained.vision_logits, atol=2e-4)


def test_a_few_steps_lower_the_loss(tok):
    import optax

    cfg = model_config.from_preset("nano").replace(scan_layers=False, num_hidden_layers=1)
    params = tl.init_model(cfg, seed=0)
    scene = world.scene_from_seed(5, kind="image")
    seqs = [nd.qa_sequence(tok, np.full((1, 256), 3), nq.questions_for(scene, "image"), "standard", "image")]
    batch = tl.to_device(nd.make_batch(seqs, 448))
    opt = optax.adam(1e-2)
    update = tl.make_update(cfg, opt, vf.NUM_USED)
    state = opt.init(params)
    losses = []
    for _ in range(6):
        params, state, loss = update(params, state, batch, False)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_offset_amplitudes_single_out_their_distance():
    from lwm_serve.model import layers

    cfg = model_config.from_preset("nano")
    theta = layers.rope_inv_freq(cfg.head_dim, cfg.theta).astype(np.float64)
    for offset in (257, 256, 16):
        amp = tl.offset_amplitudes(cfg, offset, margin=8.0)
        d = np.arange(2048)
        score = np.cos(np.outer(d - offset, theta)) @ amp
        others = np.delete(score, offset)
        assert score[offset] - others.max() >= 8.0 - 1e-6


def _first_layer_attention(params, cfg, ids, vision):
    """[N heads, T, T] softmax weights of the first layer, taken from inside the served forward."""
    seen = []

    def capture(q, k, v, mask):
        logits = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
        logits = jnp.where(mask[:, None], logits, -jnp.inf)
        seen.append(jax.nn.softmax(logits, axis=-1)[0])
        return tl.causal_blocked_attention(q, k, v, mask)

    t = ids.shape[1]
    transformer.forward(params, cfg, jnp.asarray(ids), jnp.asarray(vision),
                        jnp.asarray(np.arange(t)[None]), attention_fn=capture)
    return np.asarray(seen[0])


def test_offset_heads_start_out_attending_their_distance():
    cfg = model_config.from_preset("nano").replace(scan_layers=False, num_hidden_layers=1)
    offsets = (257, 256, 16)
    rng = np.random.default_rng(0)
    # Vision embeddings start from the codebook's features (larger than the random rest):
    # the heads must be as sharp on them as on text.
    features = rng.normal(size=(vf.NUM_USED, vf.NUM_SIGNALS))
    params = tl.init_model(cfg, seed=0, code_features=features, frame_heads=offsets)
    t = 700
    ids = rng.integers(0, vf.NUM_USED, (1, t))
    probs = _first_layer_attention(params, cfg, ids, np.ones((1, t), bool))
    for head, offset in enumerate(offsets):
        rows = np.arange(offset + 20, t, 37)
        mass = probs[head, rows, rows - offset]
        assert mass.min() > 0.6 and mass.mean() > 0.85, (offset, mass.min(), mass.mean())
    # The head left alone attends as a random head does: spread out.
    free = probs[3, 600, :601]
    assert free.max() < 0.2
    # Without offsets the init is the plain random one.
    plain = tl.init_model(cfg, seed=0)
    wte = plain["transformer"]["wte"]["embedding"]
    assert np.abs(wte[:, -1]).mean() < 2 * np.abs(wte[:, :-1]).mean()


def test_pinned_offset_heads_survive_updates_that_would_wash_them_out():
    cfg = model_config.from_preset("nano").replace(scan_layers=False, num_hidden_layers=2)
    offsets = (257, 256, 258, 241)
    with pytest.raises(ValueError, match="first layer"):
        tl.pin_offset_heads(cfg, offsets + (273,))
    rng = np.random.default_rng(1)
    params = tl.init_model(cfg, seed=0, code_features=rng.normal(size=(vf.NUM_USED, vf.NUM_SIGNALS)),
                           frame_heads=offsets)
    pin = tl.pin_offset_heads(cfg, offsets)
    # Updates as big as the first steps': every weight moved by noise of its own size.
    noisy = jax.tree_util.tree_map(lambda w: w + rng.normal(size=w.shape).astype(w.dtype) * (np.std(w) + 0.02),
                                   params)
    t = 700
    ids = rng.integers(0, vf.NUM_USED, (1, t))
    rows = np.arange(300, t, 37)
    washed = _first_layer_attention(noisy, cfg, ids, np.ones((1, t), bool))
    assert washed[0, rows, rows - 257].mean() < 0.5
    pinned = pin(jax.tree_util.tree_map(jnp.asarray, noisy))
    probs = _first_layer_attention(pinned, cfg, ids, np.ones((1, t), bool))
    for head, offset in enumerate(offsets):
        mass = probs[head, rows, rows - offset]
        assert mass.min() > 0.5 and mass.mean() > 0.8, (offset, mass.min(), mass.mean())
    # The rest of the model keeps its update: only the constructed entries are put back.
    w1 = pinned["transformer"]["h"]["0"]["feed_forward"]["w1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(w1), noisy["transformer"]["h"]["0"]["feed_forward"]["w1"]["kernel"])
    wq1 = pinned["transformer"]["h"]["1"]["attention"]["wq"]["kernel"]
    np.testing.assert_array_equal(np.asarray(wq1), noisy["transformer"]["h"]["1"]["attention"]["wq"]["kernel"])
    # Pinning twice changes nothing.
    again = pin(pinned)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(pinned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_motion_weights_fall_on_the_objects_of_later_frames(tok):
    from lwm_serve.nano import train as nt

    scene = world.scene_from_seed(3, num_frames=4)
    codes = np.tile(np.arange(256) % 7, (4, 1))
    codes[:, :64] = 0  # 0 is the commonest code: the background
    weights = nt._motion_weights(codes, 5.0)
    assert weights.shape == codes.shape
    assert (weights[0] == 1.0).all()  # the first frame has nothing to compare with
    assert (weights[1:][codes[1:] != 0] == 5.0).all() and (weights[1:][codes[1:] == 0] == 1.0).all()
    assert nt._motion_weights(codes, 1.0) is None
    # In a sequence, each code's next-code target carries its code's weight, in order;
    # the targets themselves and the text's weights do not change.
    qas = nq.questions_for(scene, "video")[:1]
    plain = nd.qa_sequence(tok, codes, qas, "standard", "video")
    seq = nd.qa_sequence(tok, codes, qas, "standard", "video", code_weight=weights)
    np.testing.assert_array_equal(seq.target, plain.target)
    code_targets = (seq.target != nd.IGNORE) & (seq.target < 8192) & np.r_[seq.vision[1:], False]
    np.testing.assert_array_equal(seq.target[code_targets], codes.reshape(-1))
    np.testing.assert_array_equal(seq.weight[code_targets], weights.reshape(-1))
    np.testing.assert_array_equal(seq.weight[~code_targets], plain.weight[~code_targets])
