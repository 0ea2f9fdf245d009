"""Plain dataclasses handed between the HTTP handlers and the model worker.

No FastAPI, no pydantic, no JAX: a request is prompt rows + sampling knobs; a
record is what the engine knows about it (status, tokens generated), kept for
introspection (metrics, tests) after the request is done.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from lwm_serve.model.generation import PromptRow
from lwm_serve.model.sampling import SamplingParams


class RequestStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"   # generation ended (all rows stopped, length, or the consumer had enough)
    ABORTED = "aborted"     # the client went away
    FAILED = "failed"       # an exception in the worker (or the request ran past its deadline)

    @property
    def done(self) -> bool:
        return self not in (RequestStatus.QUEUED, RequestStatus.RUNNING)


AbortReason = Literal["client", "done", "timeout"]


class RequestTimeoutError(TimeoutError):
    """The request ran longer than the server's per-request limit."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"the request did not finish within the server's limit of {seconds:g} s")


class SessionLimitError(RuntimeError):
    """A request names a new session while `max_sessions` are already pinned."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        super().__init__(f"{max_sessions} sessions already keep prefills pinned (--max-sessions); release "
                         "one with DELETE /v1/sessions/{session} or send the request without `session`")


@dataclass(frozen=True)
class PrefillProgress:
    """Prompt chunks prefilled so far (delivered before the first token)."""

    chunks_done: int
    chunks_total: int
    tokens_done: int
    tokens_total: int
    cached_tokens: int


@dataclass(frozen=True)
class GenerationRequest:
    """One API request as the model sees it.

    Attributes:
        request_id: unique id (also in the response id).
        rows: prompt rows; a request with n choices has n rows (per prompt).
        sampling: one SamplingParams per row.
        max_new_tokens: steps to run at most.
        seed: rng seed (None: fresh entropy). All rows of the request are
            sampled from ONE key as one batch; the noise differs per row, so
            choices differ, and the same seed + rows give the same choices.
        stop_token_ids: a row ends after sampling one of these (empty: ignore EOS).
        top_logprobs: alternatives to report per step (0: none).
        logprobs: report the chosen tokens' logprobs (False: StepOutput.logprobs are zeros,
            and a batch where nobody asks skips computing them).
        timeout_s: the request fails once it has run this long (None: no limit).
        session: keep this prompt's prefill pinned in the prefix cache under
            this name until the session is released (follow-up questions).
        reuse_prefix: look the prompt up in the prefix cache (and keep it after).
        head: "text" samples from `lm_head`, "vision" from `vision_head` (VQGAN
            codes; every fed token is then a vision token).
        uncond_rows: classifier-free guidance: one unconditional prompt per row.
            Each output then holds two pool rows (cond, uncond) fed the same
            token, and is sampled from `uncond + cfg_scale * (cond - uncond)`
            with its SamplingParams' `cfg_scale`.
        forced_tokens: step -> a token emitted instead of the sampled one (or
            None): the vision layout's frame delimiters.
        key: an explicit raw [2] uint32 threefry key to start the rows' chains
            from instead of `seed_key(seed)` (reference key chains, for parity
            with LWM's own scripts).
    """

    request_id: str
    rows: Sequence[PromptRow]
    sampling: Sequence[SamplingParams]
    max_new_tokens: int
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0
    logprobs: bool = True
    timeout_s: float | None = None
    session: str | None = None
    reuse_prefix: bool = True
    head: Literal["text", "vision"] = "text"
    uncond_rows: Sequence[PromptRow] | None = None
    forced_tokens: Callable[[int], "int | None"] | None = None
    key: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.sampling):
            raise ValueError("a request needs at least one row and one SamplingParams per row")
        if self.uncond_rows is not None and len(self.uncond_rows) != len(self.rows):
            raise ValueError("uncond_rows must pair with rows")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def prompt_rows(self) -> list[PromptRow]:
        """Every prompt row the request occupies in the pool: rows, then uncond rows."""
        return list(self.rows) + list(self.uncond_rows or ())

    @property
    def use_cfg(self) -> bool:
        return self.uncond_rows is not None

    @property
    def prompt_tokens(self) -> int:
        return max(len(r.ids) for r in self.prompt_rows)


@dataclass
class RequestRecord:
    """What the engine knows about a request; written by the worker thread only
    (plain attribute writes, read from the event loop for introspection)."""

    request_id: str
    rows: int
    max_new_tokens: int
    status: RequestStatus = RequestStatus.QUEUED
    steps: int = 0  # decode steps run (tokens generated per row)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    ended: float | None = None
    abort_event: threading.Event = field(default_factory=threading.Event, repr=False)
    abort_reason: AbortReason | None = None

    @property
    def tokens_generated(self) -> int:
        return self.steps * self.rows

    def request_abort(self, reason: AbortReason) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        self.abort_event.set()
