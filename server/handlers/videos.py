"""/v1/videos: OpenAI's video job protocol over `FrameDrawer` and `JobStore` (no FastAPI here).

A job is an asyncio task on the server's loop that submits engine requests
(so its frames are engine work, decoded beside chat, never in front of it):

1. the first frame, unless the video starts from a reference image or from the
   frames of the video being extended: the image prompt, the image settings;
2. the remaining frames in ONE request: the video prompt + the frames so far,
   the video settings (LWM's `vision_generation` does the same);
3. VQGAN decode, H.264 MP4 at `VIDEO_FPS` (PyAV), a WebP thumbnail (the first
   frame) and the codes, written before the job is marked completed.

`progress` is the share of frames produced (100 only once the files exist).
Duration: `seconds` x VIDEO_FPS frames ("4" -> 16); the `n_frames` extra asks
for a frame count directly. Everything a request can get wrong is checked
before the job is stored (a 4xx leaves nothing behind): the prompt, the size,
the frames against the context, the reference image or clip (decoded and
VQGAN-encoded up front).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any, Literal

import numpy as np

from lwm_serve.server.engine.scheduler import QueueFullError
from lwm_serve.server.errors import InvalidRequestError, NotFoundError, UnsupportedFeatureError, to_api_error
from lwm_serve.server.handlers import common
from lwm_serve.server.handlers.frame_generation import (IMAGE_DEFAULTS, VIDEO_DEFAULTS, VIDEO_FPS, DrawSettings,
                                                        FrameDrawer, draw_settings, generation_keys, output_side,
                                                        resize_frames, size_text)
from lwm_serve.server.media_sources import MediaSource
from lwm_serve.server.schemas.videos import (VideoCreateRequest, VideoDeleted, VideoError, VideoExtendRequest,
                                             VideoList, VideoObject)
from lwm_serve.server.stores.jobs import JobNotFound, JobStore, VideoJob
from lwm_serve.tokenizers.errors import MediaError
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.media_encode import encode_image, encode_mp4
from lwm_serve.tokenizers.media_ingest import encode_media
from lwm_serve.tokenizers.vision_layout import CODES_PER_FRAME, TOKENS_PER_FRAME

logger = logging.getLogger(__name__)

CREATE_SECONDS = ("4", "8", "12")              # OpenAI's VideoSeconds
EXTEND_SECONDS = ("4", "8", "12", "16", "20")  # OpenAI's extension lengths
DEFAULT_SECONDS = "4"
Variant = Literal["video", "thumbnail", "spritesheet"]
_MEDIA = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.webp", "image/webp")}


def frame_count(seconds: str | None, n_frames: int | None, choices: tuple[str, ...]) -> tuple[int, str]:
    """(frames, the `seconds` string reported): n_frames wins, else seconds x VIDEO_FPS."""
    if n_frames is not None:
        return n_frames, f"{n_frames / VIDEO_FPS:g}"
    seconds = seconds or DEFAULT_SECONDS
    if seconds not in choices:
        raise InvalidRequestError(f"seconds must be one of {list(choices)} (or send the extra n_frames), got "
                                  f"{seconds!r}", param="seconds")
    return int(seconds) * VIDEO_FPS, seconds


class VideosHandler:
    def __init__(self, drawer: FrameDrawer, store: JobStore, vision: Any, model_name: str) -> None:
        self.drawer = drawer
        self.store = store
        self.vision = vision  # MediaService (reference images and clips), or None without a VQGAN
        self.model_name = model_name
        self._tasks: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------------ create / extend

    async def create(self, req: VideoCreateRequest, upload: MediaSource | None = None) -> VideoObject:
        common.check_model(req.model, self.model_name)
        self.drawer.require_vqgan()
        _check_prompt(req.prompt)
        side = output_side(req.size, self.drawer.native_side)
        n, seconds = frame_count(req.seconds, req.n_frames, CREATE_SECONDS)
        image, video = self._settings(req)
        first = None
        if upload is not None or req.input_reference is not None:
            first = await self._reference_image(req, upload)
        self._check_fits(req.prompt, first is None, n)
        job = VideoJob(self.store.new_id(), req.prompt, size_text(side), seconds, n, self.model_name,
                       params=_params(req, image, video))
        return self._start(job, first, n - (0 if first is None else 1), side, image, video, req)

    async def extend(self, req: VideoExtendRequest, upload: MediaSource | None = None) -> VideoObject:
        common.check_model(req.model, self.model_name)
        self.drawer.require_vqgan()
        _check_prompt(req.prompt)
        if (req.video is None) == (upload is None):
            raise InvalidRequestError("send the video to extend: 'video': {'id': ...} (a completed video, or an "
                                      "uploaded clip's file id) or a multipart 'video' file", param="video")
        new, _ = frame_count(req.seconds, req.n_frames, EXTEND_SECONDS)
        image, video = self._settings(req)
        source_id, side = None, self.drawer.native_side
        if req.video is not None and req.video.id.startswith("video_"):
            source = await asyncio.to_thread(self._get, req.video.id)
            if source.status != "completed":
                raise InvalidRequestError(f"video {source.id} is {source.status}; only a completed video can be "
                                          "extended", param="video", code="video_not_ready")
            frames = await asyncio.to_thread(lambda: np.load(self.store.output(source.id, "codes.npy")))
            source_id, side = source.id, int(source.size.split("x")[0])
        else:
            frames = await self._clip_codes(req.video.id if req.video is not None else None, upload)
        total = len(frames) + new
        self._check_fits(req.prompt, False, total, existing=len(frames))
        job = VideoJob(self.store.new_id(), req.prompt, size_text(side), f"{total / VIDEO_FPS:g}", total,
                       self.model_name, remixed_from=source_id, params=_params(req, image, video))
        return self._start(job, frames, new, side, image, video, req)

    def _settings(self, req: Any) -> tuple[DrawSettings, DrawSettings]:
        image = draw_settings(IMAGE_DEFAULTS, temperature=req.temperature_image, top_k=req.top_k_image,
                              cfg_scale=req.cfg_scale_image)
        video = draw_settings(VIDEO_DEFAULTS, temperature=req.temperature_video, top_k=req.top_k_video,
                              cfg_scale=req.cfg_scale_video)
        self.drawer.check_rows(1)
        return image, video

    def _check_fits(self, prompt: str, draws_first: bool, total: int, existing: int = 0) -> None:
        if draws_first:
            cond, _ = self.drawer.image_rows(prompt)
            self.drawer.check_fits(len(cond.ids), 1, "prompt")
        cond, _ = self.drawer.video_rows(prompt, np.zeros((0, CODES_PER_FRAME), np.int32))
        param = "n_frames" if existing == 0 else "seconds"
        self.drawer.check_fits(len(cond.ids), total, param)

    def _start(self, job: VideoJob, frames: np.ndarray | None, new: int, side: int, image: DrawSettings,
               video: DrawSettings, req: Any) -> VideoObject:
        keys = generation_keys(req.seed, req.key_source, 2)
        self.store.save(job)
        task = asyncio.create_task(self._run(job, frames, new, side, image, video, req.seed, keys))
        self._tasks[job.id] = task
        logger.info("[%s] video job: %d frames (%d new), size %s", job.id, job.n_frames, new, job.size)
        return to_object(job)

    # ------------------------------------------------------------------ the job

    async def _run(self, job: VideoJob, frames: np.ndarray | None, new: int, side: int, image: DrawSettings,
                   video: DrawSettings, seed: int | None, keys: list) -> None:
        try:
            job.status = "in_progress"
            await asyncio.to_thread(self.store.save, job)
            codes = [] if frames is None else [np.asarray(f).reshape(-1) for f in frames]
            target = len(codes) + new
            if not codes:
                cond, uncond = self.drawer.image_rows(job.prompt)
                tokens = await self._draw(job, cond, uncond, 1, image, seed, keys[0], 0, target)
                codes.append(np.asarray(tokens[:CODES_PER_FRAME]))
            rest = target - len(codes)
            if rest:
                cond, uncond = self.drawer.video_rows(job.prompt, np.stack(codes))
                tokens = await self._draw(job, cond, uncond, rest, video, seed, keys[1], len(codes), target)
                codes += [np.asarray(tokens[i * TOKENS_PER_FRAME: i * TOKENS_PER_FRAME + CODES_PER_FRAME])
                          for i in range(rest)]
            grid = np.stack(codes).reshape(len(codes), 16, 16).astype(np.int32)
            await asyncio.to_thread(self._write_outputs, job.id, grid, side)
            job.status, job.progress, job.completed_at = "completed", 100, int(time.time())
            await asyncio.to_thread(self.store.save, job)
            logger.info("[%s] video completed: %d frames", job.id, len(codes))
        except asyncio.CancelledError:
            raise  # deleted, or the server is stopping (a restart marks it failed)
        except Exception as exc:
            err = to_api_error(exc)
            if err.status >= 500:
                logger.exception("[%s] video job failed", job.id, exc_info=exc)
            job.status, job.completed_at = "failed", int(time.time())
            job.error = {"code": err.code or "generation_failed", "message": err.message}
            await asyncio.to_thread(self.store.remove_outputs, job.id)
            await asyncio.to_thread(self.store.save, job)
        finally:
            self._tasks.pop(job.id, None)

    async def _draw(self, job: VideoJob, cond: Any, uncond: Any, frames: int, settings: DrawSettings,
                    seed: int | None, key: Any, done: int, target: int) -> list[int]:
        """One engine request of `frames` frames; job progress as each frame completes."""
        while True:
            try:
                handle = self.drawer.submit(cond, uncond, 1, frames, settings, seed, key, prefix="vid-")
                break
            except QueueFullError as exc:  # the job waits its turn; chat keeps the 503s
                await asyncio.sleep(exc.retry_after_s)
        tokens: list[int] = []
        async for step in self.drawer.steps(handle):
            tokens.append(int(step.tokens[0]))
            if len(tokens) % TOKENS_PER_FRAME == 0:
                job.progress = min(99, 100 * (done + len(tokens) // TOKENS_PER_FRAME) // target)
                await asyncio.to_thread(self.store.save, job)
        return tokens

    def _write_outputs(self, job_id: str, grid: np.ndarray, side: int) -> None:
        pixels = resize_frames(self.drawer.decode_codes(grid), side)
        buf = io.BytesIO()
        np.save(buf, grid)
        self.store.write_output(job_id, "codes.npy", buf.getvalue())
        self.store.write_output(job_id, "thumbnail.webp", encode_image(pixels[0], "webp"))
        self.store.write_output(job_id, "video.mp4", encode_mp4(list(pixels), fps=VIDEO_FPS))

    # ------------------------------------------------------------------ media in

    async def _reference_image(self, req: VideoCreateRequest, upload: MediaSource | None) -> np.ndarray:
        """The reference image as one frame of codes [1, 16, 16] (the video's first frame)."""
        ref = req.input_reference
        if upload is not None and ref is not None:
            raise InvalidRequestError("send input_reference once (an upload or an object)", param="input_reference")
        if ref is not None and (ref.image_url is None) == (ref.file_id is None):
            raise InvalidRequestError("input_reference needs exactly one of image_url or file_id",
                                      param="input_reference")
        source = upload
        if source is None:
            assert ref is not None
            url = ref.image_url if ref.image_url is not None else ref.file_id
            try:
                source = await self.vision.sources.resolve(url, "input_reference")
            except Exception as exc:
                raise to_api_error(exc, param="input_reference") from exc
        try:
            return await self._encode(source, SamplingSpec(max_frames=1), "input_reference")
        finally:
            if source is not upload:
                source.close()

    async def _clip_codes(self, file_id: str | None, upload: MediaSource | None) -> np.ndarray:
        """An uploaded clip's frames at VIDEO_FPS as codes [N, 16, 16]."""
        source = upload
        if source is None:
            try:
                source = await asyncio.to_thread(self.vision.sources.stored, file_id)
            except Exception as exc:
                raise to_api_error(exc, param="video") from exc
        return await self._encode(source, SamplingSpec(max_frames=None, fps=VIDEO_FPS), "video")

    async def _encode(self, source: MediaSource, spec: SamplingSpec, param: str) -> np.ndarray:
        vision = self.vision
        try:
            codes, _ = await asyncio.to_thread(
                encode_media, source.data, spec, vision.vqgan, vision.cache, max_duration_s=vision.max_video_seconds,
                content_sha256=source.sha256, label=source.label, max_pixels=vision.max_pixels)
        except MediaError as exc:
            err = to_api_error(exc, param=param)
            err.message = source.clean_message(err.message)
            raise err from exc
        if not len(codes):
            raise InvalidRequestError(f"{source.label} has no frame to continue from", param=param, code="no_frames")
        return np.asarray(codes, np.int32)

    # ------------------------------------------------------------------ read / delete

    def _get(self, video_id: str) -> VideoJob:
        try:
            return self.store.get(video_id)
        except JobNotFound as exc:
            raise NotFoundError(str(exc), param="video_id", code="video_not_found") from None

    async def retrieve(self, video_id: str) -> VideoObject:
        return to_object(await asyncio.to_thread(self._get, video_id))

    async def list(self, *, limit: int, order: Literal["asc", "desc"], after: str | None) -> VideoList:
        if after is not None:
            await asyncio.to_thread(self._get, after)
        jobs = await asyncio.to_thread(self.store.list, order=order, after=after, limit=limit + 1)
        page = [to_object(j) for j in jobs[:limit]]
        return VideoList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                         has_more=len(jobs) > limit)

    async def delete(self, video_id: str) -> VideoDeleted:
        await asyncio.to_thread(self._get, video_id)
        task = self._tasks.pop(video_id, None)
        if task is not None:
            task.cancel()  # aborts its engine request
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.store.delete, video_id)
        return VideoDeleted(id=video_id)

    async def content(self, video_id: str, variant: str) -> tuple[Any, str]:
        """(path, media type) of a completed video's asset."""
        job = await asyncio.to_thread(self._get, video_id)
        if variant == "spritesheet":
            raise UnsupportedFeatureError("the spritesheet variant is not supported; use video or thumbnail",
                                          param="variant")
        if variant not in _MEDIA:
            raise InvalidRequestError(f"variant must be video or thumbnail, got {variant!r}", param="variant")
        if job.status != "completed":
            raise InvalidRequestError(f"video {job.id} is {job.status}; its content exists once it is completed",
                                      param="video_id", code="video_not_ready")
        name, media_type = _MEDIA[variant]
        return self.store.output(job.id, name), media_type

    async def close(self) -> None:
        """Cancels running jobs (server shutdown; the next start marks them failed)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def to_object(job: VideoJob) -> VideoObject:
    return VideoObject(id=job.id, model=job.model, status=job.status, progress=job.progress,
                       created_at=job.created_at, completed_at=job.completed_at, prompt=job.prompt, size=job.size,
                       seconds=job.seconds, remixed_from_video_id=job.remixed_from,
                       error=VideoError(**job.error) if job.error else None)


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise InvalidRequestError("prompt must not be empty", param="prompt")


def _params(req: Any, image: DrawSettings, video: DrawSettings) -> dict[str, Any]:
    return {"seed": req.seed, "key_source": req.key_source, "image": vars(image), "video": vars(video)}
