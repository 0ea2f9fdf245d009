"""The colour + shape classifier on world renders, after the codecs, and on pictures it must refuse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from lwm_serve.nano import classify, world
from lwm_serve.tokenizers.media_decode import decode_media
from lwm_serve.tokenizers.media_encode import encode_image

SEEDS = range(world.HELD_OUT_SEED_BASE, world.HELD_OUT_SEED_BASE + 300)


def _found(obj: world.WorldObject, guesses: list[classify.ObjectGuess]) -> bool:
    return any(g.color == obj.color and g.shape == obj.shape for g in guesses)


def _share_found(pairs: list[tuple[np.ndarray, tuple[world.WorldObject, ...]]]) -> float:
    hits = total = 0
    for frame, objects in pairs:
        guesses = classify.find_objects(frame)
        hits += sum(_found(o, guesses) for o in objects)
        total += len(objects)
    return hits / total


def test_every_object_of_clean_renders_is_recognised() -> None:
    pairs = []
    for seed in SEEDS:
        scene = world.scene_from_seed(seed)
        frames = scene.frames()
        pairs += [(frames[0], scene.objects), (frames[-1], scene.objects)]
    assert _share_found(pairs) >= 0.98


def test_single_object_pictures_are_classified_at_any_size() -> None:
    # One object per picture, every colour x shape, then shrunk and grown: the verdict holds.
    right = total = 0
    for i, (color, shape) in enumerate((c, s) for c in world.COLORS for s in world.SHAPES):
        obj = world.WorldObject(shape, color, 48 + 3 * i, 40 + 5 * i, 30 + 4 * i, "still", 0)
        frame = world.render((obj,))
        for side in (256, 128, 512):
            resized = np.asarray(Image.fromarray(frame).resize((side, side)))
            guess = classify.classify(resized)
            total += 1
            right += guess is not None and (guess.color, guess.shape) == (color, shape)
    assert right == total


def test_frames_survive_h264_mp4() -> None:
    pairs = []
    for seed in list(SEEDS)[:40]:
        scene = world.scene_from_seed(seed)
        decoded = decode_media(world.video_mp4(scene))
        assert len(decoded) == scene.num_frames
        pairs += [(frame, scene.objects) for _, frame in decoded]
    assert _share_found(pairs) >= 0.98


def test_images_survive_png_and_classify_reads_bytes() -> None:
    right = 0
    seeds = list(SEEDS)[:60]
    for seed in seeds:
        scene = world.scene_from_seed(seed, "image")
        png = world.image_png(scene)
        guesses = classify.find_objects(png)  # bytes in
        right += all(_found(o, guesses) for o in scene.objects)
        if len(scene.objects) == 1:
            guess = classify.classify(png)
            assert guess is not None and (guess.color, guess.shape) == (scene.objects[0].color,
                                                                         scene.objects[0].shape)
    assert right / len(seeds) >= 0.98


def test_stray_bright_specks_do_not_hide_the_object() -> None:
    obj = world.WorldObject("circle", "green", 72, 100, 60, "still", 0)
    frame = world.render((obj,)).copy()
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, 256, 2000), rng.integers(0, 256, 2000)  # ~3% of the pixels
    frame[ys, xs] = rng.integers(100, 256, (2000, 3))
    guess = classify.classify(frame)
    assert guess is not None and (guess.color, guess.shape) == ("green", "circle")


def test_lossy_jpeg_still_reads_the_colour_and_shape() -> None:
    obj = world.WorldObject("triangle", "yellow", 80, 90, 100, "still", 0)
    guess = classify.classify(encode_image(world.render((obj,)), "jpeg", 60))
    assert guess is not None and (guess.color, guess.shape) == ("yellow", "triangle")


@pytest.mark.parametrize("make", [
    lambda rng: np.zeros((256, 256, 3), np.uint8),
    lambda rng: rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
    lambda rng: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1),
    lambda rng: np.full((256, 256, 3), (128, 128, 128), np.uint8),
], ids=["black", "noise", "blocky-noise", "grey"])
def test_no_clear_object_is_refused(make) -> None:  # noqa: ANN001
    image = make(np.random.default_rng(0))
    assert classify.classify(image) is None
    assert classify.find_objects(image) == []


def test_two_objects_of_a_size_are_no_single_answer() -> None:
    scene = world.Scene((world.WorldObject("circle", "red", 70, 10, 10, "still", 0),
                         world.WorldObject("square", "blue", 70, 150, 150, "still", 0)), 1)
    frame = scene.frames()[0]
    assert classify.classify(frame) is None
    assert {(g.color, g.shape) for g in classify.find_objects(frame)} == {("red", "circle"), ("blue", "square")}


def test_a_colour_off_the_palette_is_refused() -> None:
    obj = world.WorldObject("square", "red", 80, 90, 90, "still", 0)
    frame = world.render((obj,)).copy()
    frame[frame[..., 0] == 255] = (140, 70, 200)  # purple: far from every palette colour
    assert classify.classify(frame) is None


def test_a_long_bar_is_no_square() -> None:
    frame = np.zeros((256, 256, 3), np.uint8)
    frame[100:130, 20:230] = world.COLORS["green"]
    guess = classify.classify(frame)
    assert guess is not None and guess.color == "green" and guess.shape == "unknown"


def test_bad_arrays_are_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        classify.classify(np.zeros((256, 256), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        classify.classify(np.zeros((256, 256, 3), np.float32))


def test_guess_boxes_match_the_world() -> None:
    obj = world.WorldObject("circle", "white", 64, 30, 50, "still", 0)
    guess = classify.classify(world.render((obj,)))
    assert guess is not None
    assert guess.box == obj.box(0)
    assert dataclasses.asdict(guess)["fill"] == pytest.approx(np.pi / 4, abs=0.04)
