"""Turning one choice's sampled tokens into text: detokenize, stop strings, counts.

`StopMatcher` removes stop strings from a streamed text even when a stop string
is split across tokens: text that could be the beginning of a stop string is
held back until it is known not to be one. `ChoiceDecoder` combines the
incremental detokenizer, the stop matcher, the stop token (EOS) and the
per-token logprob records of one choice. Pure Python; no FastAPI, no JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from lwm_serve.tokenizers.text import IncrementalDetokenizer, TextTokenizer

FinishReason = Literal["stop", "length"]


class StopMatcher:
    """Streams text, cutting it at the first occurrence of any stop string.

    Contract: `"".join(feed(d) for d in deltas) + flush()` equals the full text
    truncated before the first stop string (or the full text if none occurs);
    `matched` then names the stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Adds text; returns the part that is safe to emit now."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        first, which = -1, None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (first < 0 or i < first):
                first, which = i, stop
        if which is not None:
            self.matched, self._held = which, ""
            return buf[:first]
        hold = 0
        for stop in self.stops:  # longest suffix of buf that begins some stop string
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """The held-back text (call once the text is complete)."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out


@dataclass(frozen=True)
class TokenRecord:
    """One generated token with its logprob and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    text_offset: int  # characters of this choice's text emitted before this token


class ChoiceDecoder:
    """The text of one choice, built token by token.

    Args:
        tokenizer: text tokenizer.
        stops: stop strings (removed from the output; finish_reason 'stop').
        stop_token_ids: tokens that end the choice (EOS); not part of the text.
        keep_logprobs: record a TokenRecord per content token.
    """

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str], stop_token_ids: Sequence[int],
                 *, keep_logprobs: bool = False) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._matcher = StopMatcher(stops)
        self._stop_ids = frozenset(int(t) for t in stop_token_ids)
        self._keep = keep_logprobs
        self._new: list[TokenRecord] = []
        self.text_len = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, logprob: float = 0.0, top: Sequence[tuple[int, float]] = ()) -> str:
        """Feeds one sampled token; returns the text delta (often "")."""
        if self.finished:
            return ""
        self.completion_tokens += 1
        if token_id in self._stop_ids:
            return self._finish("stop")
        if self._keep:
            self._new.append(TokenRecord(int(token_id), float(logprob), tuple(top), self.text_len))
        out = self._matcher.feed(self._detok.add(token_id))
        if self._matcher.matched is not None:
            self.finish_reason = "stop"
        self.text_len += len(out)
        return out

    def finish_length(self) -> str:
        """The generation ran out of tokens: flushes and sets finish_reason."""
        return "" if self.finished else self._finish("length")

    def _finish(self, reason: FinishReason) -> str:
        out = self._matcher.feed(self._detok.finish())
        out += self._matcher.flush()
        self.finish_reason = "stop" if self._matcher.matched is not None else reason
        self.text_len += len(out)
        return out

    def take_logprobs(self) -> list[TokenRecord]:
        """Token records added since the last call."""
        out, self._new = self._new, []
        return out
