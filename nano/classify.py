"""Colour + shape of the objects in a picture of LWM-Nano's world (a simple classifier).

Used to judge generated images ("Generate an image of a red circle.") and to
check that media survive the codecs. Nothing is learned: the world's objects are
flat-coloured filled shapes on black, so

* foreground = pixels whose brightest channel is above `DARK` (the background is black);
* objects = 8-connected foreground blobs of at least `MIN_AREA_FRACTION` of the picture;
* colour = the palette colour (`world.COLORS`) nearest the blob's median colour,
  accepted only when near enough (`MAX_COLOR_DISTANCE`) and when most of the blob's
  pixels agree with it (`MIN_COLOR_AGREEMENT`): noise and muddy blobs are rejected;
* shape = the blob's fill of its bounding box: a square fills it (1.0), an
  inscribed circle pi/4 (0.785), a triangle half of it (0.5). The triangle is
  also checked to be wider at the bottom than at the top (the world's triangles
  point up).

`classify(image)` answers for a picture that should hold ONE object (None when there
is no clear single blob); `find_objects(image)` lists every object it recognises.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from scipy import ndimage

from lwm_serve.nano.world import COLORS

DARK = 96  # brightest channel at or below this: background
MIN_AREA_FRACTION = 0.004  # ~ a 16x16 blob in 256x256: smaller is a speck, not an object
SINGLE_BLOB_SHARE = 0.85  # `classify`: the largest blob holds this share of the objects' pixels
MAX_COLOR_DISTANCE = 110.0  # RGB distance from the blob's median to its palette colour
MIN_COLOR_AGREEMENT = 0.7  # share of the blob's pixels whose nearest palette colour is the blob's
MAX_ASPECT = 1.3  # the world's boxes are square: a much longer box is no world object
# Fill-ratio bands; the boundaries sit halfway between the ideal ratios (1, pi/4, 1/2).
SQUARE_FILL = (1.0 + np.pi / 4) / 2  # 0.89
CIRCLE_FILL = (np.pi / 4 + 0.5) / 2  # 0.64
MIN_FILL = 0.3

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], np.float32)  # [5, 3]


@dataclasses.dataclass(frozen=True)
class ObjectGuess:
    color: str
    shape: str  # circle | square | triangle | unknown
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int  # pixels
    fill: float  # area / box area
    color_distance: float  # RGB distance of the blob's median colour to the palette colour


def to_rgb(image: np.ndarray | bytes) -> np.ndarray:
    """uint8 [H, W, 3] from an array or encoded image bytes (PNG, JPEG, WebP)."""
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"an image must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def nearest_color(rgb: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest an RGB triple, and its distance."""
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, np.float32)[None], axis=1)
    i = int(np.argmin(d))
    return _NAMES[i], float(d[i])


def _shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape of one blob (its mask cropped to its bounding box) and its fill ratio."""
    h, w = mask.shape
    fill = float(mask.mean())
    if max(h, w) > MAX_ASPECT * min(h, w) or fill < MIN_FILL:
        return "unknown", fill
    if fill >= SQUARE_FILL:
        return "square", fill
    if fill >= CIRCLE_FILL:
        return "circle", fill
    # A triangle pointing up: its top quarter is much narrower than its bottom quarter.
    q = max(1, h // 4)
    top, bottom = mask[:q].sum(axis=1).mean(), mask[-q:].sum(axis=1).mean()
    return ("triangle" if top < 0.6 * bottom else "unknown"), fill


def _guess(rgb: np.ndarray, labels: np.ndarray, index: int, sl: tuple[slice, slice]) -> ObjectGuess | None:
    mask = labels[sl] == index
    pixels = rgb[sl][mask].astype(np.float32)  # [n, 3]
    color, distance = nearest_color(np.median(pixels, axis=0))
    nearest = np.argmin(np.linalg.norm(pixels[:, None] - _PALETTE[None], axis=2), axis=1)
    if distance > MAX_COLOR_DISTANCE or (nearest == _NAMES.index(color)).mean() < MIN_COLOR_AGREEMENT:
        return None
    shape, fill = _shape(mask)
    box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return ObjectGuess(color, shape, box, int(mask.sum()), fill, distance)


def _blobs(rgb: np.ndarray) -> tuple[np.ndarray, list[tuple[int, tuple[slice, slice], int]]]:
    """Labels and (label, bounding slices, area) of the foreground blobs, largest first."""
    fg = rgb.max(axis=2) > DARK
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if n == 0:
        return labels, []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    slices = ndimage.find_objects(labels)
    blobs = [(i + 1, slices[i], int(areas[i + 1])) for i in range(n)]
    return labels, sorted(blobs, key=lambda b: -b[2])


def find_objects(image: np.ndarray | bytes) -> list[ObjectGuess]:
    """Every recognisable object, largest first (blobs too small or of no palette colour are left out)."""
    rgb = to_rgb(image)
    labels, blobs = _blobs(rgb)
    min_area = MIN_AREA_FRACTION * rgb.shape[0] * rgb.shape[1]
    out = []
    for index, sl, area in blobs:
        if area < min_area:
            break
        guess = _guess(rgb, labels, index, sl)
        if guess is not None:
            out.append(guess)
    return out


def classify(image: np.ndarray | bytes) -> ObjectGuess | None:
    """Colour and shape of the one object of a picture; None when there is no clear single blob
    (nothing bright, several objects of similar size, noise, or a colour off the palette)."""
    rgb = to_rgb(image)
    labels, blobs = _blobs(rgb)
    if not blobs:
        return None
    index, sl, area = blobs[0]
    min_area = MIN_AREA_FRACTION * rgb.shape[0] * rgb.shape[1]
    # Specks (a decoder's stray bright pixels) do not count against the single object.
    total = sum(b[2] for b in blobs if b[2] >= min_area)
    if area < min_area or area < SINGLE_BLOB_SHARE * total:
        return None
    return _guess(rgb, labels, index, sl)
