"""Properties of LWM-Nano's world over many seeds, its media through the server's decoder,
and the question templates with their grading."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_serve.nano import questions, world
from lwm_serve.nano.classify import nearest_color
from lwm_serve.tokenizers.media_decode import decode_media

SEEDS = st.integers(min_value=0, max_value=2**40)
KINDS = st.sampled_from(["video", "image"])
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def _gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Pixels between two boxes (x1/y1 exclusive) along the axis where they are furthest apart."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


@settings(max_examples=300, deadline=None)
@given(seed=SEEDS, kind=KINDS)
def test_scenes_obey_the_world_rules(seed: int, kind: str) -> None:
    scene = world.scene_from_seed(seed, kind)
    if kind == "image":
        assert scene.num_frames == 1
        assert all(o.direction == "still" and o.speed == 0 for o in scene.objects)
    else:
        assert world.MIN_FRAMES <= scene.num_frames <= world.MAX_FRAMES
    assert 1 <= len(scene.objects) <= 3
    assert len({o.shape for o in scene.objects}) == len(scene.objects)
    for o in scene.objects:
        assert o.shape in world.SHAPES and o.color in world.COLORS and o.direction in world.DIRECTIONS
        assert world.MIN_SIZE <= o.size <= world.MAX_SIZE
        if o.direction == "still":
            assert o.speed == 0
        else:
            assert world.MIN_SPEED <= o.speed <= world.MAX_SPEED
        for t in range(scene.num_frames):
            x0, y0, x1, y1 = o.box(t)
            assert 0 <= x0 and 0 <= y0 and x1 <= world.FRAME and y1 <= world.FRAME
            assert (x1 - x0, y1 - y0) == (o.size, o.size)
            dx, dy = _STEP[o.direction]
            assert (x0, y0) == (o.x + dx * o.speed * t, o.y + dy * o.speed * t)
    for t in range(scene.num_frames):
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert _gap(a.box(t), b.box(t)) >= world.GAP


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, kind=KINDS)
def test_the_same_seed_gives_the_same_scene_and_pixels(seed: int, kind: str) -> None:
    a, b = world.scene_from_seed(seed, kind), world.scene_from_seed(seed, kind)
    assert a == b
    np.testing.assert_array_equal(a.frames(), b.frames())


def test_seeds_and_kinds_give_different_scenes() -> None:
    base = world.HELD_OUT_SEED_BASE
    videos = {world.scene_from_seed(base + i) for i in range(50)}
    assert len(videos) == 50
    assert world.scene_from_seed(base) != world.scene_from_seed(base, "image")


def test_renders_draw_each_object_in_its_box_in_its_colour() -> None:
    for seed in range(world.HELD_OUT_SEED_BASE, world.HELD_OUT_SEED_BASE + 60):
        scene = world.scene_from_seed(seed)
        frames = scene.frames()
        assert frames.shape == (scene.num_frames, world.FRAME, world.FRAME, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(scene.frames(reverse=True), frames[::-1])
        for t in (0, scene.num_frames - 1):
            for o in scene.objects:
                alone = world.render((o,), t)
                ys, xs = np.nonzero(alone.max(axis=2))
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box(t)
                assert {tuple(p) for p in alone[ys, xs]} == {world.COLORS[o.color]}
                # the full frame shows the object where it is drawn alone (no overlaps)
                np.testing.assert_array_equal(frames[t][ys, xs], alone[ys, xs])


def test_many_seeds_cover_the_whole_world() -> None:
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for seed in range(world.HELD_OUT_SEED_BASE, world.HELD_OUT_SEED_BASE + 400):
        scene = world.scene_from_seed(seed)
        seen["count"][len(scene.objects)] += 1
        seen["frames"][scene.num_frames] += 1
        for o in scene.objects:
            seen["shape"][o.shape] += 1
            seen["color"][o.color] += 1
            seen["direction"][o.direction] += 1
    assert set(seen["count"]) == {1, 2, 3}
    assert set(seen["frames"]) == set(range(world.MIN_FRAMES, world.MAX_FRAMES + 1))
    assert set(seen["shape"]) == set(world.SHAPES)
    assert set(seen["color"]) == set(world.COLORS)
    assert set(seen["direction"]) == set(world.DIRECTIONS)


def _center(box: tuple[int, int, int, int], shape: str) -> tuple[int, int]:
    x0, y0, x1, y1 = box
    # A triangle's box centre is inside it, but its centroid (2/3 down) is deeper inside.
    cy = y0 + 2 * (y1 - y0) // 3 if shape == "triangle" else (y0 + y1) // 2
    return (x0 + x1) // 2, cy


def test_mp4s_decode_through_the_server_decoder_with_their_colours() -> None:
    checked = 0
    for seed in range(world.HELD_OUT_SEED_BASE, world.HELD_OUT_SEED_BASE + 25):
        scene = world.scene_from_seed(seed)
        decoded = decode_media(world.video_mp4(scene))
        assert len(decoded) == scene.num_frames
        assert [ts for ts, _ in decoded] == pytest.approx([t / world.FPS for t in range(scene.num_frames)])
        for t, (_, frame) in enumerate(decoded):
            assert frame.shape == (world.FRAME, world.FRAME, 3) and frame.dtype == np.uint8
            for o in scene.objects:
                cx, cy = _center(o.box(t), o.shape)
                assert nearest_color(frame[cy, cx])[0] == o.color, (seed, t, o)
                checked += 1
    assert checked > 100


def test_reversed_mp4s_play_backwards() -> None:
    scene = next(s for s in map(world.scene_from_seed, range(world.HELD_OUT_SEED_BASE, world.HELD_OUT_SEED_BASE
                                                             + 100))
                 if any(o.direction != "still" for o in s.objects))
    forward = [f for _, f in decode_media(world.video_mp4(scene))]
    backward = [f for _, f in decode_media(world.video_mp4(scene, reverse=True))]
    assert len(backward) == len(forward)
    # Frames differ (lossy codec): each reversed frame is nearest its mirror in time.
    for t, frame in enumerate(backward):
        dists = [np.abs(frame.astype(int) - f.astype(int)).mean() for f in forward]
        assert int(np.argmin(dists)) == scene.num_frames - 1 - t


def test_images_are_one_png_frame() -> None:
    scene = world.scene_from_seed(world.HELD_OUT_SEED_BASE, "image")
    png = world.image_png(scene)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = decode_media(png)
    assert len(decoded) == 1
    np.testing.assert_array_equal(decoded[0][1], scene.frames()[0])


# ---------------------------------------------------------------------------
# questions


@settings(max_examples=200, deadline=None)
@given(seed=SEEDS, kind=KINDS)
def test_questions_cover_the_right_types_per_medium(seed: int, kind: str) -> None:
    scene = world.scene_from_seed(seed, kind)
    qas = questions.questions_for(scene, kind)  # type: ignore[arg-type]
    by_kind = collections.Counter(q.kind for q in qas)
    n = len(scene.objects)
    assert by_kind["shape"] == (1 if n == 1 else 0)
    assert by_kind["color"] == n
    assert by_kind["direction"] == (n if kind == "video" else 0)
    assert by_kind["count"] == 1
    assert len({q.question for q in qas}) == len(qas)  # one answer per question
    for q in qas:
        assert q.answer in questions.ANSWER_WORDS[q.kind]
        assert questions.grade(q.kind, q.reply, q.answer)
        assert q.question.endswith("?")
    if n == 1:
        shape = next(q for q in qas if q.kind == "shape")
        assert shape.question == f"What shape is in the {kind}?" and shape.answer == scene.objects[0].shape
    count = next(q for q in qas if q.kind == "count")
    assert count.answer == world.COUNT_WORDS[n - 1]
    for o in scene.objects:
        assert any(q.kind == "color" and o.shape in q.question and q.answer == o.color for q in qas)
        if kind == "video":
            assert any(q.kind == "direction" and o.shape in q.question and q.answer == o.direction for q in qas)


@pytest.mark.parametrize("kind,reply,truth,ok", [
    ("color", "It is red.", "red", True),
    ("color", "RED", "red", True),
    ("color", "It is blue.", "red", False),
    ("color", "I do not know.", "red", False),  # no answer word
    ("color", "It is red or blue.", "red", False),  # two answer words
    ("color", "red red", "red", False),  # the same word twice is still two
    ("color", "", "red", False),
    ("shape", "It is a circle.", "circle", True),
    ("shape", "A circle inside a square.", "circle", False),
    ("shape", "circles", "circle", False),  # a whole word only
    ("direction", "It is standing still.", "still", True),
    ("direction", "It is moving left.", "left", True),
    ("direction", "It moves left, then up.", "left", False),
    ("count", "There are two shapes.", "two", True),
    ("count", "There is one shape, no, three.", "one", False),
])
def test_grade_wants_exactly_one_answer_word(kind: str, reply: str, truth: str, ok: bool) -> None:
    assert questions.grade(kind, reply, truth) is ok


def test_image_prompts_name_colour_and_shape() -> None:
    for color in world.COLORS:
        for shape in world.SHAPES:
            prompt = questions.image_prompt(color, shape)
            assert questions.answer_words("color", prompt) == [color]
            assert questions.answer_words("shape", prompt) == [shape]
