"""Image / video bytes or paths to uint8 RGB frames, and the reference's preprocessing.

Images go through Pillow (PNG, JPEG, WebP, GIF first frame, ...), with EXIF
orientation applied. Video goes through PyAV, streamed from the path (a file is
never read into memory as a whole; bytes are wrapped in a BytesIO).

Video decoding is planned before any pixel is decoded:
1. scan the video stream's packets (demux only, no decode) to get the frame
   timeline (pts) and the keyframes;
2. choose frames on that timeline (`frame_sampling.select_frames`);
3. decode with one strategy, converting only the kept frames to RGB:
   - "full": decode every frame up to the last wanted one;
   - "seek": seek to the keyframe before each wanted frame (unless it is
     already behind the decoder) and decode forward to it: best when frames
     are sparse on a long video;
   - "keyframe": one linear demux pass that feeds the decoder only the
     packets from the keyframe before each wanted frame up to that frame;
     every other packet never reaches the decoder (keyframe-aware skipping at
     the packet level, which also saves the bitstream parsing that
     `skip_frame='NONKEY'` would still do).
   All strategies return the same frames for the same spec (tested); each
   reads on its own in `decode_strategies`.

Frames are streamed (`iter_video_frames` / `iter_media_frames`): each is handed
out as soon as it is decoded, so a consumer working a batch at a time (the
ingestion pipeline, `vision_cache.encode_media`) holds O(batch) frames, not an
hour of them. `decode_video` / `decode_media` are the same as lists.

Timestamps are the real presentation times (pts * time_base), relative to the
stream start, so variable-frame-rate video samples by real time. Display-matrix
rotation (phone clips) is applied so frames come out upright.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from contextlib import closing, contextmanager
from typing import Callable, Generator, Iterator, Literal, Sequence, Union

import av
import numpy as np
from PIL import Image

from lwm_serve.tokenizers.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaTooLongError,
    NoVideoStreamError,
    UnsupportedMediaError,
)
from lwm_serve.tokenizers import decode_strategies as ds
# is_image / load_image / check_pixels are part of this module's API (media callers import them from here).
from lwm_serve.tokenizers.image_decode import check_pixels, is_image, load_image, read_head, source_name  # noqa: F401
from lwm_serve.tokenizers.frame_sampling import SamplingSpec, select_frames

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes]
Progress = Callable[[int, int], None]  # (frames kept so far, frames wanted)
Strategy = Literal["auto", "full", "seek", "keyframe"]
# (timestamp_s, RGB frame) in time order; a generator, so `closing()` releases the container early.
Frames = Generator[tuple[float, np.ndarray], None, None]
STRATEGIES: tuple[str, ...] = ("full", "seek", "keyframe")
FRAME_SIZE = 256

# Leading bytes of containers FFmpeg reads: a file that starts like one but does
# not open is damaged; one that matches none is an unsupported format.
_CONTAINER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "MP4/MOV"),
    (4, b"moov", "MOV"),
    (4, b"mdat", "MOV"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"RIFF", "AVI"),
    (0, b"OggS", "Ogg"),
    (0, b"FLV", "FLV"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"\x47", "MPEG-TS"),
)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream.

    Attributes:
        duration_s: duration in seconds (stream, else container; 0 if unknown).
        n_frames_estimate: frame count from the container, else duration * fps.
        fps: average frame rate (0 if unknown).
        width, height: coded frame size (before rotation).
        rotation: display rotation in degrees, counter-clockwise (0, 90, 180, 270).
        codec: decoder name, e.g. "h264".
    """

    duration_s: float
    n_frames_estimate: int
    fps: float
    width: int
    height: int
    rotation: int
    codec: str


@dataclasses.dataclass(frozen=True)
class Timeline:
    """A video stream's frames in presentation order, from a packet scan.

    Attributes:
        pts: [n] ascending pts in stream time_base units.
        keyframe: [n] whether each frame is a keyframe (a decode entry point).
        seconds: [n] presentation times relative to the stream start.
    """

    pts: list[int]
    keyframe: list[bool]
    seconds: list[float]


# ----------------------------------------------------------------------------
# preprocessing (exactly the reference's _process_frame)


def preprocess_frame(img: Image.Image | np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """Resize the shorter side to `size`, centre crop, scale to [-1, 1].

    Bit-exact with LWM's `vision_chat.Sampler._process_frame`: the other side is
    `int(size * long / short)`, Pillow's default resize filter (bicubic for RGB),
    a float crop box (Pillow rounds it), then `float32 / 127.5 - 1`.

    Args:
        img: PIL image (converted to RGB) or uint8 [H, W, 3] array.
        size: output side.

    Returns:
        [size, size, 3] float32 in [-1, 1].
    """
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"a frame must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        img = Image.fromarray(img, "RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    if width < height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    img = img.resize((new_w, new_h))
    box = ((new_w - size) / 2, (new_h - size) / 2, (new_w + size) / 2, (new_h + size) / 2)
    return np.array(img.crop(box), dtype=np.float32) / 127.5 - 1


def preprocess_frames(frames: Sequence[np.ndarray], size: int = FRAME_SIZE) -> np.ndarray:
    """`preprocess_frame` over uint8 frames: [N, size, size, 3] float32."""
    if len(frames) == 0:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack([preprocess_frame(f, size) for f in frames])


# ----------------------------------------------------------------------------
# sources (images: `image_decode`)

def _sniff_container(head: bytes) -> str | None:
    for offset, magic, name in _CONTAINER_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


# ----------------------------------------------------------------------------
# video


@contextmanager
def _open_video(src: Source, max_pixels: int | None = None
                ) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    head = read_head(src)
    name = source_name(src)
    target = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    try:
        container = av.open(target, mode="r")
    except av.error.FFmpegError as e:
        kind = _sniff_container(head)
        if kind is not None:
            raise CorruptMediaError(f"{name}: looks like {kind} but cannot be read (truncated or damaged)") from e
        raise UnsupportedMediaError(f"{name}: not a recognised image or video format") from e
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            if "audio" in kinds or "subtitle" in kinds:
                raise NoVideoStreamError(f"{name}: no video stream (streams: {', '.join(kinds)})")
            # Only unknown/data streams (or none): a damaged index, e.g. a cut MP4 moov.
            raise CorruptMediaError(f"{name}: no readable audio or video stream (truncated or damaged)")
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise UnsupportedMediaError(f"{name}: video codec {stream.codec_context and stream.codec_context.name!r} "
                                        "has no decoder in this build")
        # The stream's coded size comes from its headers: a huge frame is refused before one is decoded.
        check_pixels(name, stream.codec_context.width, stream.codec_context.height, max_pixels)
        stream.thread_type = "AUTO"  # frame + slice threads
        yield container, stream
    finally:
        container.close()


def _check_duration(name: str, duration_s: float, max_duration_s: float | None) -> None:
    if max_duration_s is not None and duration_s > max_duration_s:
        raise MediaTooLongError(f"{name}: video is {duration_s:.1f} s long; the limit is {max_duration_s:.1f} s")


def _container_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe_video(src: Source, max_duration_s: float | None = None, *, max_pixels: int | None = None) -> VideoInfo:
    """Read container metadata (and decode one frame for the rotation).

    Raises:
        MediaError subclasses for empty/corrupt/unsupported/audio-only/too long
        media, or frames over `max_pixels` (checked before that frame is decoded).
    """
    name = source_name(src)
    with _open_video(src, max_pixels) as (container, stream):
        duration = _container_duration(container, stream)
        _check_duration(name, duration, max_duration_s)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        n = stream.frames or int(round(duration * fps))
        rotation = 0
        try:
            for frame in container.decode(stream):
                rotation = ds.rotation(frame)
                break
            else:
                raise EmptyMediaError(f"{name}: the video stream has no decodable frame")
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{name}: cannot decode the first frame ({e})") from e
        return VideoInfo(
            duration_s=duration,
            n_frames_estimate=int(n),
            fps=fps,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            rotation=rotation,
            codec=stream.codec_context.name,
        )


def _scan_timeline(container: av.container.InputContainer, stream: av.video.stream.VideoStream, name: str) -> Timeline:
    entries: dict[int, bool] = {}
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0 or packet.is_discard:
                continue
            entries[packet.pts] = entries.get(packet.pts, False) or packet.is_keyframe
    except av.error.FFmpegError as e:
        raise CorruptMediaError(f"{name}: reading the video stream failed ({e})") from e
    if not entries:
        raise EmptyMediaError(f"{name}: the video stream has no frames")
    pts = sorted(entries)
    start = stream.start_time if stream.start_time is not None else pts[0]
    tb = stream.time_base
    return Timeline(pts=pts, keyframe=[entries[p] for p in pts], seconds=[float((p - start) * tb) for p in pts])


def _check_complete(container, stream, timeline: Timeline, name: str) -> None:
    """Raise CorruptMediaError if the frames stop well before the declared duration.

    A truncated file whose header survived (WebM, MKV, TS, fragmented MP4)
    demuxes "cleanly" up to the cut. The declared duration is the video
    stream's own, else the container's when the video is its only stream
    (with audio the container may rightly run longer than the video).
    """
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None and len(container.streams) == 1:
        declared = container.duration / av.time_base
    else:
        return
    secs = timeline.seconds
    step = (secs[-1] - secs[0]) / (len(secs) - 1) if len(secs) > 1 else 0.0
    shortfall = declared - (secs[-1] + step)
    if shortfall > max(0.5, 0.1 * declared):
        raise CorruptMediaError(
            f"{name}: video frames stop at {secs[-1]:.2f} s but the file declares {declared:.2f} s "
            "(truncated or damaged)"
        )


def frame_timeline(src: Source, max_duration_s: float | None = None, *, max_pixels: int | None = None) -> Timeline:
    """The video's frame timeline from a packet scan (no pixel decoding)."""
    name = source_name(src)
    with _open_video(src, max_pixels) as (container, stream):
        _check_duration(name, _container_duration(container, stream), max_duration_s)
        return _scan_timeline(container, stream, name)


def choose_strategy(n_wanted: int, n_frames: int) -> str:
    """"seek" when frames are sparse (fewer than 1 in 8), else "full"."""
    return "seek" if n_wanted * 8 < n_frames else "full"


def iter_video_frames(
    src: Source,
    sampling: SamplingSpec | None = None,
    strategy: Strategy = "auto",
    max_duration_s: float | None = None,
    progress: Progress | None = None,
    *,
    max_pixels: int | None = None,
) -> Frames:
    """Stream the frames a sampling spec picks, one at a time, in time order.

    Only the frames not yet handed out are held (normally none or one: the
    decoder returns frames in presentation order), so a consumer that keeps a
    batch at a time decodes an hour of video in O(batch) memory. The container
    stays open until the iterator is exhausted or closed (`contextlib.closing`).

    Args:
        src: path (streamed) or bytes of any container FFmpeg reads.
        sampling: which frames (default: the reference's 8 uniform frames).
        strategy: "full", "seek", "keyframe" or "auto" (see the module doc).
        max_duration_s: reject longer videos with MediaTooLongError.
        max_pixels: reject frames of more pixels with MediaTooLargeError (from the
            stream's headers, before any frame is decoded).
        progress: called as progress(kept, wanted) after each kept frame (job
            progress, log lines); never called inside the decoder's threads.
            An exception it raises stops decoding and propagates (cancellation).

    Yields:
        (timestamp_s, frame [H, W, 3] uint8 RGB, upright).

    Raises:
        ValueError: an unknown strategy (at once, before iterating).
        MediaError subclasses, each naming what is wrong (while iterating: the
            frames before a damaged one may already have been yielded).
    """
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"unknown decode strategy {strategy!r}; use auto or one of {STRATEGIES}")
    return _iter_video(src, sampling or SamplingSpec(), strategy, max_duration_s, progress, max_pixels)


def decode_video(
    src: Source,
    sampling: SamplingSpec | None = None,
    strategy: Strategy = "auto",
    max_duration_s: float | None = None,
    progress: Progress | None = None,
    *,
    max_pixels: int | None = None,
) -> list[tuple[float, np.ndarray]]:
    """`iter_video_frames` as a list: every sampled frame in memory at once.

    Fine for a handful of frames; long videos should be consumed with
    `iter_video_frames` (memory O(frames) here).

    Returns:
        [(timestamp_s, frame [H, W, 3] uint8 RGB, upright)] in time order.
    """
    return list(iter_video_frames(src, sampling, strategy, max_duration_s, progress, max_pixels=max_pixels))


def _iter_video(src: Source, sampling: SamplingSpec, strategy: str, max_duration_s: float | None,
                progress: Progress | None, max_pixels: int | None) -> Frames:
    name = source_name(src)
    with _open_video(src, max_pixels) as (container, stream):
        _check_duration(name, _container_duration(container, stream), max_duration_s)
        timeline = _scan_timeline(container, stream, name)
        _check_duration(name, timeline.seconds[-1], max_duration_s)
        _check_complete(container, stream, timeline, name)
        chosen = select_frames(timeline.seconds, sampling)
        if not chosen:
            return
        if strategy == "auto":
            strategy = choose_strategy(len(chosen), len(timeline.pts))
        wanted = [timeline.pts[i] for i in chosen]
        seconds = {timeline.pts[i]: timeline.seconds[i] for i in chosen}
        logger.debug("%s: decoding %d of %d frames with %s", name, len(wanted), len(timeline.pts), strategy)
        got: set[int] = set()
        try:
            # The scan left the demuxer at the end: rewind (this also flushes the decoder).
            container.seek(timeline.pts[0], stream=stream, backward=True, any_frame=False)
            if strategy == "full":
                frames = ds.decode_full(container, stream, wanted, got)
            elif strategy == "seek":
                frames = ds.decode_seek(container, stream, wanted, ds.keyframe_before(timeline, wanted), got)
            else:
                frames = ds.decode_keyframe(container, stream, wanted, ds.keyframe_before(timeline, wanted), got)
            with closing(frames):  # stop the strategy before its container closes
                yield from ds.in_order(frames, wanted, seconds, progress, name)
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{name}: decoding failed ({e})") from e


# ----------------------------------------------------------------------------
# any media


def iter_media_frames(
    src: Source,
    sampling: SamplingSpec | None = None,
    strategy: Strategy = "auto",
    max_duration_s: float | None = None,
    progress: Progress | None = None,
    *,
    max_pixels: int | None = None,
) -> Frames:
    """Image or video to a stream of timestamped uint8 frames (an image is one frame at t=0).

    Arguments, memory and errors as `iter_video_frames`; for an image, `sampling`
    is ignored and `progress(1, 1)` is called once it is decoded.

    Yields:
        (timestamp_s, frame [H, W, 3] uint8 RGB, upright), in time order.
    """
    if is_image(src, max_pixels):
        return _iter_image(src, progress, max_pixels)
    return iter_video_frames(src, sampling, strategy, max_duration_s, progress, max_pixels=max_pixels)


def _iter_image(src: Source, progress: Progress | None, max_pixels: int | None) -> Frames:
    frame = load_image(src, max_pixels)
    if progress is not None:
        progress(1, 1)
    yield 0.0, frame


def decode_media(
    src: Source,
    sampling: SamplingSpec | None = None,
    strategy: Strategy = "auto",
    max_duration_s: float | None = None,
    progress: Progress | None = None,
    *,
    max_pixels: int | None = None,
) -> list[tuple[float, np.ndarray]]:
    """`iter_media_frames` as a list (every frame in memory at once: short media only).

    Raises:
        MediaError subclasses, each naming what is wrong.
    """
    return list(iter_media_frames(src, sampling, strategy, max_duration_s, progress, max_pixels=max_pixels))
