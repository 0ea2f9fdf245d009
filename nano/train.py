"""Train LWM-Nano from nothing: tokenizer, VQGAN, language model (`lwm-serve train-nano`).

Deterministic for a recipe: every scene comes from a seed, the optimizers are
seeded, and XLA on CPU is deterministic. The output directory has the layout
the server loads (the demo's): tokenizer/, config.json, params (the reference's
params:: format), vqgan/{config.json, vqgan_params.pkl}, plus training.json
(recipe, losses, timings) and losses.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.model import checkpoint
from lwm_serve.model import config as model_config
from lwm_serve.nano import data as nd
from lwm_serve.nano import probe
from lwm_serve.nano import questions as nq
from lwm_serve.nano import vqgan_fit as vf
from lwm_serve.nano import world
from lwm_serve.tokenizers.media_decode import decode_media

logger = logging.getLogger(__name__)

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights; the defaults are the shipped LWM-Nano's."""

    seed: int = 0
    # VQGAN
    vq_videos: int = 300
    kmeans_iters: int = 25
    decoder_steps: int = 150
    decoder_batch: int = 8
    # language model
    lm_videos: int = 2400
    lm_images: int = 8000
    lm_draws: int = 1800
    steps: int = 3200
    tokens_per_batch: int = 4096
    lr: float = 3e-3
    warmup: int = 100
    uncond_every: int = 2  # every n-th drawing is also trained as the CFG partner `<s><vision>`
    layout: str = "standard"
    answer_weight: float = 5.0  # loss weight of the reply tokens that decide the answer
    vision_weight: float = 0.5  # loss weight of the media's next-code targets in question batches
    # Share of the batches drawn from images (0: by their share of tokens, about 1/6). An image
    # carries its questions in 300 tokens where a video needs 1,000-2,000: shape, colour and
    # count are learnt from many more examples per step.
    image_share: float = 0.5
    # Loss weight of the next-code targets where an object stands in a video's later frames
    # (the codes that are not the background's): the only codes that tell what moved where.
    motion_weight: float = 1.0
    # Offsets the first layer's heads attend to, built and pinned (train_lm.init_model,
    # pin_offset_heads; at most one per head): 257 is the same patch one frame back,
    # 256/258 its right/left neighbours there, 241/273 below/above.
    frame_heads: tuple[int, ...] = ()
    video_objects: int = 0  # training videos hold this many objects (0: the world's 1-3)
    video_frames: int = 0  # training videos have this many frames (0: the world's 4-8)
    question_kinds: tuple[str, ...] = ()  # train only these question types (empty: all)
    # held-out teacher-forced accuracy (nano/probe.py) every `probe_every` steps (0: never)
    probe_every: int = 200
    probe_videos: int = 40
    probe_images: int = 30


# Bounding-box sides of the objects the model learns to draw: half a patch past a patch
# edge, so the object's right and bottom sides fall inside a patch and its codes there
# say "the object ends here".
DRAW_SIZES = (56, 72, 88)

# A recipe small enough for a smoke test of the whole pipeline (minutes, meaningless weights).
QUICK = Recipe(vq_videos=20, decoder_steps=2, lm_videos=12, lm_images=12, lm_draws=8, steps=4, warmup=1,
               tokens_per_batch=2048, probe_every=2, probe_videos=2, probe_images=2)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=2.0)


def build_tokenizer(out: Path) -> Path:
    from lwm_serve.tokenizers import demo_tokenizer as dt

    return dt.build_demo_tokenizer(out, corpus=CORPUS)


def decoded_frames(scene: world.Scene) -> np.ndarray:
    """The frames the server sees: through H.264 and the server's own decoder."""
    return np.stack([f for _, f in decode_media(world.video_mp4(scene))])


def fit_vqgan(recipe: Recipe, log: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    frames = np.concatenate([decoded_frames(world.scene_from_seed(recipe.seed * 10**6 + i))
                             for i in range(recipe.vq_videos)])
    enc = vf.constructed_encoder()
    pts, counts = vf.unique_descriptors(vf.fast_descriptors(enc, frames), decimals=2)
    centroids = vf.kmeans(pts, counts, vf.NUM_USED, recipe.kmeans_iters, recipe.seed)
    enc["quantize"]["embeddings"] = vf.codebook(centroids, seed=recipe.seed)
    codes = vf.fast_codes(enc, frames)
    rng = np.random.default_rng(recipe.seed)
    order = rng.permutation(len(frames))
    bar = _progress(recipe.decoder_steps, "VQGAN decoder")

    def batch(step: int):
        idx = order[(np.arange(recipe.decoder_batch) + step * recipe.decoder_batch) % len(order)]
        return codes[idx], frames[idx].astype(np.float32) / 127.5 - 1

    def progress(step: int, loss: float):
        bar.update(1)
        bar.set_postfix(mse=f"{loss:.4f}")

    dec, losses = vf.train_decoder(batch, enc["quantize"]["embeddings"], recipe.decoder_steps,
                                   seed=recipe.seed, progress=progress)
    bar.close()
    params = vf.full_params(enc, enc["quantize"]["embeddings"], dec)
    log["vqgan"] = {"frames": int(len(frames)), "unique_descriptors": int(len(pts)),
                    "decoder_mse": losses, "seconds": time.perf_counter() - t0}
    return params


def _video_sequences(tok, vq_params, recipe: Recipe, rng: np.random.Generator) -> list[nd.Sequence_]:
    seqs = []
    shape = {k: v for k, v in (("num_objects", recipe.video_objects), ("num_frames", recipe.video_frames)) if v}
    for i in range(recipe.lm_videos):
        scene = world.scene_from_seed(recipe.seed * 10**6 + 100_000 + i, **shape)
        codes = vf.fast_codes(vq_params, decoded_frames(scene), batch=8).reshape(scene.num_frames, -1)
        qas = _asked(recipe, nq.questions_for(scene, "video"))
        if not qas:
            continue
        rng.shuffle(qas)
        seqs.append(nd.qa_sequence(tok, codes, qas, recipe.layout, f"video-{scene.num_frames}",
                                   recipe.answer_weight, _motion_weights(codes, recipe.motion_weight)))
    return seqs


def _motion_weights(codes: np.ndarray, weight: float) -> np.ndarray | None:
    """[F, 256]: `weight` at the object codes of frames after the first, 1 elsewhere."""
    if weight == 1.0:
        return None
    out = np.where(codes != nd.background_code(codes), weight, 1.0).astype(np.float32)
    out[0] = 1.0
    return out


def _asked(recipe: Recipe, qas: list[nq.QA]) -> list[nq.QA]:
    return [qa for qa in qas if qa.kind in recipe.question_kinds] if recipe.question_kinds else qas


def _image_sequences(tok, vq_params, recipe: Recipe, rng: np.random.Generator) -> list[nd.Sequence_]:
    seqs = []
    frames, scenes = [], []
    for i in range(recipe.lm_images):
        scene = world.scene_from_seed(recipe.seed * 10**6 + 200_000 + i, kind="image")
        scenes.append(scene)
        frames.append(decode_media(world.image_png(scene))[0][1])
    if not frames:
        return seqs
    codes = vf.fast_codes(vq_params, np.stack(frames)).reshape(len(frames), 1, -1)
    for scene, c in zip(scenes, codes):
        qas = _asked(recipe, nq.questions_for(scene, "image"))
        if not qas:
            continue
        rng.shuffle(qas)
        seqs.append(nd.qa_sequence(tok, c, qas, recipe.layout, "image", recipe.answer_weight))
    return seqs


def _draw_sequences(tok, vq_params, recipe: Recipe, rng: np.random.Generator) -> list[nd.Sequence_]:
    """Drawing lessons: "a {color} {shape}." then the codes of that object, in the top-left corner.

    A drawing is free to put the object anywhere. A random place makes every patch a
    guess whether the object starts there, and sampling then scatters fragments of
    several objects. The middle of the frame (the previous recipe) asks the model to
    know that it stands at code ~100 of 256, and a RoPE model has no absolute position
    to know it by. In the corner the object starts with the first code, each row
    continues the row above (16 codes back), and the codes of its right and bottom sides
    (`DRAW_SIZES`) say where it ends. Neither place is drawn recognisably yet (README).
    """
    seqs = []
    frames, objs = [], []
    for i in range(recipe.lm_draws):
        color, shape = str(rng.choice(list(world.COLORS))), str(rng.choice(world.SHAPES))
        scene = world.corner_scene(shape, color, int(rng.choice(DRAW_SIZES)))
        objs.append(scene.objects[0])
        frames.append(decode_media(world.image_png(scene))[0][1])
    if not frames:
        return seqs
    codes = vf.fast_codes(vq_params, np.stack(frames))
    for i, (obj, c) in enumerate(zip(objs, codes)):
        prompt = nq.image_prompt(obj.color, obj.shape)
        if rng.random() < 0.5:
            prompt = prompt.rstrip(".")
        seqs.append(nd.draw_sequence(tok, c, prompt))
        if i % recipe.uncond_every == 0:
            seqs.append(nd.draw_sequence(tok, c, None))
    return seqs


def _bucket(kind: str, n: int) -> int:
    """One padded length per kind of sequence (few compiled shapes): frames x 257 + text room."""
    if kind.startswith("video-"):
        return 257 * int(kind.split("-")[1]) + 192
    return {"image": 448, "draw": 320, "chat": 96}[kind]


def _batches(seqs: list[nd.Sequence_], recipe: Recipe, rng: np.random.Generator):
    """Endless batches: sequences grouped by kind, each batch ~tokens_per_batch tokens."""
    groups: dict[tuple[str, int], list[nd.Sequence_]] = {}
    for s in seqs:
        groups.setdefault((s.kind, _bucket(s.kind, len(s))), []).append(s)
    keys = sorted(groups)
    weights = np.array([sum(len(s) for s in groups[k]) for k in keys], float)
    weights /= weights.sum()
    images = np.array([k[0] == "image" for k in keys])
    if recipe.image_share and images.any() and not images.all():
        weights[images] *= recipe.image_share / weights[images].sum()
        weights[~images] *= (1 - recipe.image_share) / weights[~images].sum()
    cursors = {k: 0 for k in keys}
    orders = {k: rng.permutation(len(groups[k])) for k in keys}
    while True:
        k = keys[int(rng.choice(len(keys), p=weights))]
        length = k[1]
        b = max(1, recipe.tokens_per_batch // length)
        picked = []
        for _ in range(b):
            if cursors[k] >= len(groups[k]):
                cursors[k], orders[k] = 0, rng.permutation(len(groups[k]))
            picked.append(groups[k][orders[k][cursors[k]]])
            cursors[k] += 1
        yield k[0] == "draw", nd.make_batch(picked, length)


def train_lm(tok, vq_params, recipe: Recipe, log: dict[str, Any],
             on_step: Callable[[int, Any], None] | None = None):
    import optax  # training only

    from lwm_serve.nano import train_lm as tl

    t0 = time.perf_counter()
    rng = np.random.default_rng(recipe.seed + 1)
    seqs = (_video_sequences(tok, vq_params, recipe, rng) + _image_sequences(tok, vq_params, recipe, rng)
            + _draw_sequences(tok, vq_params, recipe, rng)
            + [nd.chat_sequence(tok, q, a) for q, a in nq.SMALL_TALK] * 20)
    t_data = time.perf_counter() - t0
    cfg = model_config.from_preset("nano").replace(scan_layers=False)
    book = vq_params["quantize"]["embeddings"][: vf.NUM_USED, : vf.NUM_SIGNALS]
    params = tl.init_model(cfg, recipe.seed, code_features=book, frame_heads=tuple(recipe.frame_heads))
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, recipe.warmup, recipe.steps, recipe.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))
    opt_state = optimizer.init(params)
    pin = tl.pin_offset_heads(cfg, tuple(recipe.frame_heads)) if recipe.frame_heads else None
    if pin is not None:
        params = jax.tree_util.tree_map(np.asarray, pin(jax.tree_util.tree_map(jnp.asarray, params)))
    update = tl.make_update(cfg, optimizer, vf.NUM_USED, recipe.vision_weight, pin)
    batches = _batches(seqs, recipe, rng)
    losses: list[tuple[int, bool, float]] = []
    probes: list[tuple[int, dict[str, Any]]] = []
    held_out = (probe.build(tok, vq_params, recipe.probe_videos, recipe.probe_images, recipe.layout)
                if recipe.probe_every else None)
    bar = _progress(recipe.steps, "LWM-Nano")
    for step in range(recipe.steps):
        draw, batch = next(batches)
        t_step = time.perf_counter()
        params, opt_state, loss = update(params, opt_state, tl.to_device(batch), draw)
        losses.append((step, draw, float(loss)))
        if on_step is not None:
            on_step(step + 1, params)
        logger.debug("step %d %s %.2fs", step, batch.ids.shape, time.perf_counter() - t_step)
        bar.update(1)
        if step % 10 == 0:
            recent = [l for _, d, l in losses[-50:] if not d]
            bar.set_postfix(loss=f"{np.mean(recent):.3f}" if recent else "-")
        if held_out is not None and ((step + 1) % recipe.probe_every == 0 or step + 1 == recipe.steps):
            acc = probe.accuracy(params, cfg, held_out, tl.causal_blocked_attention)
            probes.append((step + 1, acc))
            logger.info("step %d held-out: %s", step + 1,
                        " ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "n"))
    bar.close()
    log["lm"] = {"sequences": len(seqs), "data_seconds": t_data, "losses": losses, "probe": probes,
                 "seconds": time.perf_counter() - t0, "config": model_config.to_reference_dict(cfg)}
    return cfg, jax.tree_util.tree_map(np.asarray, params)


def plot_losses(log: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = log["lm"].get("probe") or []
    fig, axes = plt.subplots(1, 3 if probes else 2, figsize=(15 if probes else 10, 3.5))
    axes[0].plot(log["vqgan"]["decoder_mse"])
    axes[0].set(title="VQGAN decoder", xlabel="step", ylabel="MSE", yscale="log")
    for draw, name in ((False, "questions (answers + next code)"), (True, "drawings (codes)")):
        pts = [(s, l) for s, d, l in log["lm"]["losses"] if d == draw]
        if pts:
            s, l = zip(*pts)
            axes[1].plot(s, l, ".", ms=2, label=name)
    axes[1].set(title="LWM-Nano", xlabel="step", ylabel="cross-entropy", yscale="log")
    axes[1].legend()
    if probes:
        steps = [s for s, _ in probes]
        for kind in [k for k in probes[-1][1] if k not in ("n", "all")] + ["all"]:
            axes[2].plot(steps, [acc.get(kind, np.nan) for _, acc in probes], "-o", ms=3, label=kind,
                         lw=2 if kind == "all" else 1)
        axes[2].set(title="held-out answers (teacher-forced, nano/probe.py)", xlabel="step",
                    ylabel="share right", ylim=(0, 1))
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(out: Path, recipe: Recipe = Recipe(), snapshots: tuple[int, ...] = ()) -> Path:
    """The whole recipe; returns `out`, a model directory the server loads.

    `snapshots`: steps after which the weights so far are saved as out/snapshot-<step>
    (a model directory too, for measuring how accuracy grows; they do not change the run).
    """
    from lwm_serve.tokenizers.text import TextTokenizer
    from lwm_serve.tokenizers import vqgan as vq

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {"recipe": dataclasses.asdict(recipe)}
    tok = TextTokenizer(build_tokenizer(out / "tokenizer"))
    vq_params = fit_vqgan(recipe, log)
    (out / "vqgan").mkdir(exist_ok=True)
    (out / "vqgan" / "config.json").write_text(json.dumps(vf.CONFIG.to_dict(), indent=1))
    with open(out / "vqgan" / "vqgan_params.pkl", "wb") as f:
        pickle.dump(jax.tree_util.tree_map(np.asarray, vq_params), f, protocol=4)
    vq.check_params(vq_params, vf.CONFIG)
    cfg_dict = model_config.to_reference_dict(model_config.from_preset("nano").replace(scan_layers=False))

    def snapshot(step: int, params) -> None:
        if step in snapshots and step < recipe.steps:
            snap = out / f"snapshot-{step}"
            snap.mkdir(exist_ok=True)
            for part in ("tokenizer", "vqgan"):
                if not (snap / part).exists():
                    (snap / part).symlink_to(out / part, target_is_directory=True)
            _write_model(snap, cfg_dict, jax.tree_util.tree_map(np.asarray, params))

    cfg, params = train_lm(tok, vq_params, recipe, log, on_step=snapshot if snapshots else None)
    _write_model(out, model_config.to_reference_dict(cfg), params)
    log["seconds"] = time.perf_counter() - t0
    (out / "training.json").write_text(json.dumps(log))
    try:
        plot_losses(log, out / "losses.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no losses.png (pip install 'lwm-serve[train]')")
    logger.info("LWM-Nano trained in %.0f s into %s", log["seconds"], out)
    return out


def _write_model(out: Path, cfg_dict: dict[str, Any], params) -> None:
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    tmp = out / "params.tmp"
    checkpoint.save_params(tmp, params)
    os.replace(tmp, out / "params")


def compare(a: Path, b: Path) -> float:
    """Largest absolute difference between two trained directories' weights (LM and VQGAN)."""
    from lwm_serve.model import checkpoint as ck

    worst = 0.0
    cfg = model_config.from_reference_json(a / "config.json")
    pa, pb = ck.load_checkpoint(str(a / "params"), cfg), ck.load_checkpoint(str(b / "params"), cfg)
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))))
    with open(a / "vqgan" / "vqgan_params.pkl", "rb") as fa, open(b / "vqgan" / "vqgan_params.pkl", "rb") as fb:
        va, vb = pickle.load(fa), pickle.load(fb)
    for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
    return worst


def main(argv: list[str] | None = None) -> int:
    """`lwm-serve train-nano`: reproduce LWM-Nano (default recipe) into --out."""
    import argparse

    parser = argparse.ArgumentParser(prog="lwm-serve train-nano", description=(
        "Train LWM-Nano from nothing on this machine (tokenizer, VQGAN, model; the shipped "
        "recipe by default). Needs the `train` extra: pip install 'lwm-serve[train]'."))
    parser.add_argument("--out", type=Path, default=Path("lwm-nano"), help="output directory (default ./lwm-nano)")
    parser.add_argument("--quick", action="store_true", help="a tiny recipe: checks the pipeline, not a model")
    parser.add_argument("--compare", type=Path, default=None,
                        help="after training, print the largest weight difference to this directory "
                             "(e.g. the shipped weights, lwm_serve/nano/weights)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import optax  # noqa: F401
    except ImportError:
        print("lwm-serve train-nano: optax is not installed: pip install 'lwm-serve[train]'", file=sys.stderr)
        return 2
    out = train(args.out, QUICK if args.quick else Recipe())
    if args.compare is not None:
        print(f"largest weight difference to {args.compare}: {compare(out, args.compare):.3g}")
    return 0
