"""A request's media frame budget (pure: no I/O, no threads).

Frame counts come from the caller (a cache hit's exact count, a still image's
one frame, or `estimate_frames` on a probed video); here they become token
arithmetic (`Budget`), the share of the free context each video may take, the
sampling that fits (`fit_spec`) and the 400 that names the numbers and a
sampling that fits (`too_long_error`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lwm_serve.server.errors import APIError, InvalidRequestError, to_api_error
from lwm_serve.server.media_sources import MediaSource
from lwm_serve.tokenizers.frame_sampling import DEFAULT_MAX_FRAMES, SamplingSpec, estimate_n_frames
from lwm_serve.tokenizers.errors import MediaError
from lwm_serve.tokenizers.media_decode import VideoInfo
from lwm_serve.tokenizers.vision_layout import TOKENS_PER_FRAME

IMAGE_SPEC = SamplingSpec()  # a still image is one frame whatever the part asked


@dataclass
class MediaRequest:
    """One image/video of a request, its bytes resolved."""

    source: MediaSource
    spec: SamplingSpec
    auto_fps: bool | None
    param: str


@dataclass
class PlannedMedia:
    request: MediaRequest
    is_image: bool
    spec: SamplingSpec  # the sampling to use (auto_fps may have lowered it)
    n_frames: int  # exact on a cache hit, else the estimate
    key: str  # the code cache key: computed once, here, and handed to the ingestion
    hit: tuple[np.ndarray, np.ndarray] | None = None
    info: VideoInfo | None = None
    adjusted: bool = False


@dataclass(frozen=True)
class Budget:
    """Token arithmetic of a request with media."""

    context: int
    text_tokens: int
    vision_tokens: int  # TOKENS_PER_FRAME per frame
    wrapper_tokens: int  # vision_layout.wrapper_length per media item
    new_tokens: int  # max_tokens, or 1 when the server chooses it

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.vision_tokens + self.wrapper_tokens

    @property
    def fits(self) -> bool:
        return self.prompt_tokens + self.new_tokens <= self.context

    @property
    def free_frames(self) -> int:
        """Frames that fit next to the text, wrappers and new tokens."""
        return max(self.context - self.text_tokens - self.wrapper_tokens - self.new_tokens, 0) // TOKENS_PER_FRAME


def fit_spec(spec: SamplingSpec, info: VideoInfo | None, frames: int) -> SamplingSpec:
    """The largest sampling of `spec`'s range taking at most `frames` frames.

    Without fps the frames are uniform (max_frames); with fps it is lowered to
    frames / range seconds, and max_frames caps the count exactly.
    """
    if spec.fps is None:
        return dataclasses.replace(spec, max_frames=frames)
    span = _span_s(spec, info)
    fps = spec.fps if span <= 0 else min(spec.fps, _round_down(frames / span))
    return dataclasses.replace(spec, fps=fps, max_frames=frames)


def _span_s(spec: SamplingSpec, info: VideoInfo | None) -> float:
    duration = info.duration_s if info is not None else 0.0
    end = duration if spec.end is None else min(spec.end, duration or spec.end)
    return max(end - (spec.start or 0.0), 0.0)


def _round_down(x: float, digits: int = 3) -> float:
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.floor(x * scale) / scale


def estimate_frames(spec: SamplingSpec, info: VideoInfo) -> int:
    """Frames `spec` takes from a probed video (the cap when the container says nothing)."""
    if info.n_frames_estimate <= 0:  # no duration or frame count in the container: assume the cap
        return spec.max_frames or DEFAULT_MAX_FRAMES
    return estimate_n_frames(spec, info.n_frames_estimate, info.duration_s)


def budget_of(plans: Sequence[PlannedMedia], *, context: int, text_tokens: int, wrapper_tokens: int,
              max_tokens: int | None) -> Budget:
    """The token budget of `plans` (`wrapper_tokens` per media item)."""
    frames = sum(p.n_frames for p in plans)
    return Budget(context, text_tokens, frames * TOKENS_PER_FRAME, wrapper_tokens * len(plans), max_tokens or 1)


def share_frames(plans: Sequence[PlannedMedia], budget: Budget, videos: Sequence[int]) -> dict[int, int] | None:
    """Frames per video (in proportion to what each asked) once fixed items (images,
    others) are counted; None: not even one frame each fits."""
    fixed = sum(p.n_frames for i, p in enumerate(plans) if i not in videos)
    free = budget.free_frames - fixed
    wanted = sum(plans[i].n_frames for i in videos)
    if not videos or free < len(videos):
        return None
    shares = {i: max(1, plans[i].n_frames * free // wanted) for i in videos}
    return shares if sum(shares.values()) <= free else None


def suggestions(plans: Sequence[PlannedMedia], budget: Budget) -> dict[int, tuple[int, float | None]]:
    """Per video (index): the frames it may take so that everything fits, and the
    fps giving about as many over its range (None: unknown). Empty: nothing fits."""
    videos = [i for i, p in enumerate(plans) if not p.is_image]
    out = {}
    for i, frames in (share_frames(plans, budget, videos) or {}).items():
        span = _span_s(plans[i].request.spec, plans[i].info)
        out[i] = (frames, _round_down(frames / span) if span > 0 else None)
    return out


def too_long_error(plans: Sequence[PlannedMedia], budget: Budget) -> InvalidRequestError:
    """The 400 of a request that does not fit: the numbers, and a sampling that fits."""
    frames = sum(p.n_frames for p in plans)
    videos = [i for i, p in enumerate(plans) if not p.is_image]
    head = (f"this request needs about {budget.prompt_tokens} prompt tokens ({frames} frames x "
            f"{TOKENS_PER_FRAME} = {budget.vision_tokens} vision tokens + {budget.text_tokens + budget.wrapper_tokens}"
            f" text tokens) plus {budget.new_tokens} new tokens, but the context is {budget.context} tokens")
    hints = suggestions(plans, budget)
    if not hints:
        return InvalidRequestError(head + "; even one frame per video does not fit: shorten the text or "
                                   "max_tokens, or send fewer images/videos", param="messages",
                                   code="context_length_exceeded")
    hint_texts = []
    for i, (n, fps) in hints.items():
        hint = f"max_frames={n}" + (f" (or fps={fps:.3g})" if fps is not None else "")
        hint_texts.append(f"{plans[i].request.param}: {hint}")
    param = plans[videos[0]].request.param if len(videos) == 1 else "messages"
    return InvalidRequestError(f"{head}; sample fewer frames, e.g. {'; '.join(hint_texts)}, or send "
                               "\"auto_fps\": true to let the server choose", param=param,
                               code="context_length_exceeded")


def media_error(exc: MediaError, req: MediaRequest) -> APIError:
    """A decoder's MediaError as the request's 4xx, naming the part and never a server path."""
    err = to_api_error(exc, param=req.param)
    err.message = req.source.clean_message(err.message)
    err.args = (err.message,)
    return err


def spec_text(spec: SamplingSpec) -> str:
    parts = [f"{k}={v}" for k, v in (("fps", spec.fps), ("max_frames", spec.max_frames), ("start", spec.start),
                                     ("end", spec.end)) if v is not None]
    return "(" + ", ".join(parts) + ")" if parts else "(default)"
