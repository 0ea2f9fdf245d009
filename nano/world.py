"""LWM-Nano's synthetic world: seeded scenes of moving shapes, rendered as frames.

The world (also documented in the README so anyone can make in-distribution media):

* frames are 256x256 RGB, black background;
* a scene holds 1-3 filled objects whose shapes are all different (so a question
  that names a shape is unambiguous), and whose bounding boxes never overlap, with
  a gap of at least `GAP` px, in any frame;
* shapes: circle (inscribed in its box), square (the box), triangle (apex at the
  top centre, base along the bottom of the box);
* colours: red, green, blue, yellow, white (pure RGB values, `COLORS`);
* size (bounding-box side): 48-96 px;
* motion: each object moves left, right, up or down by a constant 6-16 px per
  frame, or stays still, and stays fully inside the frame in every frame;
* videos have 4-8 frames and are H.264 MP4 at 4 fps; images are one frame, PNG.

Every scene comes from one integer seed (`scene_from_seed`): training uses seeds
below `HELD_OUT_SEED_BASE`, evaluation uses seeds at or above it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from lwm_serve.tokenizers.media_encode import encode_image, encode_mp4

FRAME = 256
FPS = 4
MIN_FRAMES, MAX_FRAMES = 4, 8
MIN_SIZE, MAX_SIZE = 48, 96
MIN_SPEED, MAX_SPEED = 6, 16
GAP = 4  # px between any two bounding boxes, in every frame

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
DIRECTIONS = ("left", "right", "up", "down", "still")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
COUNT_WORDS = ("one", "two", "three")

# Seeds at or above this are never used for training (the held-out evaluation range).
HELD_OUT_SEED_BASE = 1_000_000_000

Shape = Literal["circle", "square", "triangle"]


@dataclasses.dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: int  # bounding-box side, px
    x: int  # top-left corner in frame 0
    y: int
    direction: str  # one of DIRECTIONS
    speed: int  # px per frame (0 when still)

    def box(self, t: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the bounding box in frame t, x1/y1 exclusive."""
        dx, dy = _STEP[self.direction]
        x0 = self.x + dx * self.speed * t
        y0 = self.y + dy * self.speed * t
        return x0, y0, x0 + self.size, y0 + self.size


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    num_frames: int

    def frames(self, reverse: bool = False) -> np.ndarray:
        """[num_frames, 256, 256, 3] uint8; `reverse` plays time backwards."""
        order = range(self.num_frames - 1, -1, -1) if reverse else range(self.num_frames)
        return np.stack([render(self.objects, t) for t in order])

    def object(self, shape: str) -> WorldObject:
        for obj in self.objects:
            if obj.shape == shape:
                return obj
        raise KeyError(shape)


def render(objects: tuple[WorldObject, ...] | list[WorldObject], t: int = 0) -> np.ndarray:
    """One frame of the objects at time t: [256, 256, 3] uint8."""
    img = Image.new("RGB", (FRAME, FRAME), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        x0, y0, x1, y1 = obj.box(t)
        fill = COLORS[obj.color]
        # PIL's boxes include their last pixel: x1 - 1 keeps the side at `size` px.
        if obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(img, dtype=np.uint8)


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _place(rng: np.random.Generator, shape: str, color: str, num_frames: int, direction: str,
           placed: list[WorldObject]) -> WorldObject | None:
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    speed = 0 if direction == "still" else int(rng.integers(MIN_SPEED, MAX_SPEED + 1))
    dx, dy = _STEP[direction]
    travel = speed * (num_frames - 1)
    # Start positions that keep the whole path inside the frame.
    x_lo, x_hi = max(0, -dx * travel), FRAME - size - max(0, dx * travel)
    y_lo, y_hi = max(0, -dy * travel), FRAME - size - max(0, dy * travel)
    if x_hi < x_lo or y_hi < y_lo:
        return None
    for _ in range(50):
        obj = WorldObject(shape, color, size, int(rng.integers(x_lo, x_hi + 1)),
                          int(rng.integers(y_lo, y_hi + 1)), direction, speed)
        if all(_boxes_apart(obj.box(t), other.box(t)) for other in placed for t in range(num_frames)):
            return obj
    return None


def random_scene(rng: np.random.Generator, num_objects: int | None = None, num_frames: int | None = None,
                 still_image: bool = False) -> Scene:
    """A random scene; `still_image` makes a one-frame scene (motion is meaningless there)."""
    n_frames = 1 if still_image else int(num_frames or rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    while True:
        k = int(num_objects or rng.integers(1, 4))
        shapes = rng.permutation(SHAPES)[:k]
        placed: list[WorldObject] = []
        for shape in shapes:
            color = str(rng.choice(list(COLORS)))
            direction = "still" if still_image else str(rng.choice(DIRECTIONS))
            obj = _place(rng, str(shape), color, n_frames, direction, placed)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == k:
            return Scene(tuple(placed), n_frames)


def centred_scene(shape: str, color: str, size: int) -> Scene:
    """One still object in the middle of the frame."""
    corner = (FRAME - size) // 2
    return Scene((WorldObject(shape, color, size, corner, corner, "still", 0),), 1)


def corner_scene(shape: str, color: str, size: int) -> Scene:
    """One still object in the top-left corner of the frame (how LWM-Nano is taught to draw a prompt)."""
    return Scene((WorldObject(shape, color, size, 0, 0, "still", 0),), 1)


def scene_from_seed(seed: int, kind: Literal["video", "image"] = "video", **kwargs) -> Scene:
    """The scene of one seed: the same seed always gives the same scene."""
    rng = np.random.default_rng([seed, 0 if kind == "video" else 1])
    return random_scene(rng, still_image=(kind == "image"), **kwargs)


def video_mp4(scene: Scene, reverse: bool = False) -> bytes:
    """The scene as an H.264 MP4 at the world's 4 fps."""
    return encode_mp4(list(scene.frames(reverse=reverse)), fps=FPS)


def image_png(scene: Scene) -> bytes:
    return encode_image(render(scene.objects, 0), "png")
