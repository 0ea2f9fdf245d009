"""Driving one engine request's steps into per-choice text events.

Shared by chat and completions: each output row of the request is one choice
with its own ChoiceDecoder. When every choice has finished (stop token or stop
string) the request is ended at once, so the worker stops generating.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from lwm_serve.server.engine.handle import RequestHandle
from lwm_serve.server.engine.request import PrefillProgress
from lwm_serve.server.handlers.text_output import ChoiceDecoder, FinishReason, TokenRecord


@dataclass
class ChoiceEvent:
    """What one choice produced at one step."""

    index: int
    text: str
    records: list[TokenRecord] = field(default_factory=list)
    finish_reason: FinishReason | None = None


async def choice_events(handle: RequestHandle, decoders: Sequence[ChoiceDecoder], top_n: int = 0,
                        progress: bool = False) -> AsyncIterator[list[ChoiceEvent] | PrefillProgress]:
    """Yields, per step, the events of the choices that changed (the first step always,
    maybe empty: its token was sampled even if it has no text yet); finally the
    length-finished choices. With `progress`, the engine's PrefillProgress items come
    first, as they happen. Leaving early aborts the request."""
    first = True
    async with aclosing(handle.events()) as steps:
        async for step in steps:
            if isinstance(step, PrefillProgress):
                if progress:
                    yield step
                continue
            events = []
            for i, dec in enumerate(decoders):
                if dec.finished:
                    continue
                top = (tuple(zip(step.top_ids[i].tolist(), step.top_logprobs[i].tolist()))
                       if top_n else ())
                text = dec.add(int(step.tokens[i]), float(step.logprobs[i]), top)
                records = dec.take_logprobs()
                if text or records or dec.finished:
                    events.append(ChoiceEvent(i, text, records, dec.finish_reason))
            if events or first:
                yield events
            first = False
            if all(d.finished for d in decoders):
                handle.abort("done")
                break
    tail = [ChoiceEvent(i, dec.finish_length(), dec.take_logprobs(), None)
            for i, dec in enumerate(decoders) if not dec.finished]
    for event in tail:
        event.finish_reason = decoders[event.index].finish_reason
    if tail:
        yield tail
