"""The three ways of decoding a video's wanted frames (see `media_decode`'s docstring).

Each strategy gets an open container, its video stream, the wanted frames' pts
(ascending) and a `got` set, and yields (pts, RGB frame) for wanted frames as
the decoder returns them, adding each pts to `got`, stopping once it has them
all. `in_order` turns that into frames handed out in time order.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable, Generator, Iterator

import av
import numpy as np

from lwm_serve.tokenizers.errors import CorruptMediaError

if TYPE_CHECKING:
    from lwm_serve.tokenizers.media_decode import Timeline

Progress = Callable[[int, int], None]  # (frames kept so far, frames wanted)
Decoded = Generator[tuple[int, np.ndarray], None, None]  # (pts, RGB frame) as a strategy decodes them


def rotation(frame: av.VideoFrame) -> int:
    # frame.rotation: counter-clockwise degrees of the display matrix, in [-180, 180].
    try:
        return int(round(frame.rotation / 90.0)) * 90 % 360
    except (TypeError, ValueError):
        return 0


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
    k = rotation(frame) // 90
    # np.rot90 turns counter-clockwise, the display matrix's direction.
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


# Wanted frames decoded ahead of one still missing, beyond which that one is
# declared undecodable: decoders return presentation order, so only a damaged
# stream gets here, and this bounds what it can make us hold.
MAX_PENDING = 32


def in_order(frames: Iterator[tuple[int, np.ndarray]], wanted: list[int], seconds: dict[int, float],
              progress: Progress | None, name: str) -> Iterator[tuple[float, np.ndarray]]:
    """Decoded (pts, frame) -> (seconds, frame) in `wanted` order, holding only those decoded early."""
    pending: dict[int, np.ndarray] = {}
    nxt = 0  # index in `wanted` of the next frame to hand out
    for pts, frame in frames:
        pending[pts] = frame
        del frame  # the pending dict (then the consumer) holds the only reference
        if progress is not None:
            progress(nxt + len(pending), len(wanted))
        while nxt < len(wanted) and wanted[nxt] in pending:
            pts = wanted[nxt]
            nxt += 1
            yield seconds[pts], pending.pop(pts)
        if len(pending) > MAX_PENDING:
            break
    if nxt < len(wanted):
        missing = [p for p in wanted[nxt:] if p not in pending]
        raise CorruptMediaError(
            f"{name}: {len(missing)} of {len(wanted)} frames could not be decoded (first pts {missing[0]})"
        )


def keyframe_before(timeline: "Timeline", wanted: list[int]) -> list[int]:
    keys = [p for p, k in zip(timeline.pts, timeline.keyframe) if k] or [timeline.pts[0]]
    return [keys[max(0, bisect.bisect_right(keys, p) - 1)] for p in wanted]


# Each strategy yields (pts, RGB frame) for wanted frames as the decoder returns
# them, adding each pts to `got`, and stops once it has them all.


def decode_full(container, stream, wanted: list[int], got: set[int]) -> Decoded:
    want = set(wanted)
    for frame in container.decode(stream):
        if frame.pts in want and frame.pts not in got:
            got.add(frame.pts)
            yield frame.pts, to_rgb(frame)
            if len(got) == len(want):
                return


def decode_seek(container, stream, wanted: list[int], keys: list[int],
                 got: set[int]) -> Decoded:
    frames: Iterator[av.VideoFrame] | None = None
    position = None  # pts of the last frame the decoder returned
    for target, key in zip(wanted, keys):
        if target in got:
            continue
        if frames is None or position is None or key > position:
            # The target's keyframe is ahead of the decoder: jump there (seek flushes the decoder).
            container.seek(key, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            if frame.pts is None:
                continue
            position = frame.pts
            if frame.pts == target:
                got.add(target)
                yield target, to_rgb(frame)
                break
            if frame.pts > target:
                break


def decode_keyframe(container, stream, wanted: list[int], keys: list[int],
                     got: set[int]) -> Decoded:
    want = set(wanted)
    i = 0  # next wanted frame not yet returned
    gop = None  # pts of the last keyframe packet demuxed

    def take(frames: list[av.VideoFrame]) -> Decoded:
        nonlocal i
        for frame in frames:
            if frame.pts in want and frame.pts not in got:
                got.add(frame.pts)
                yield frame.pts, to_rgb(frame)
        while i < len(wanted) and wanted[i] in got:
            i += 1

    for packet in container.demux(stream):
        if i >= len(wanted):
            break
        if packet.is_keyframe and packet.pts is not None:
            gop = packet.pts
        # Feed only from the keyframe before the next wanted frame onwards.
        if gop is None or gop < keys[i] or packet.size == 0:
            continue
        yield from take(stream.decode(packet))
    if i < len(wanted):
        yield from take(stream.decode(None))  # flush frames the (threaded) decoder still holds
