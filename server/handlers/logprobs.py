"""Token strings and bytes for OpenAI's logprobs objects (chat and legacy shapes)."""

from __future__ import annotations

from typing import Sequence

from lwm_serve.server.handlers.text_output import TokenRecord
from lwm_serve.server.schemas.chat import ChoiceLogprobs, TokenLogprob, TopLogprob
from lwm_serve.server.schemas.completions import CompletionLogprobs
from lwm_serve.tokenizers.text import TextTokenizer


class TokenTexts:
    """Per-token display string and UTF-8 bytes, cached.

    A byte-fallback piece is one raw byte: its `bytes` is that byte and its
    string is the character for ASCII, else `bytes:\\xNN` (OpenAI's notation for
    a token that is not valid UTF-8 alone). Ids past the tokenizer's vocabulary
    (a model vocabulary padded beyond it) have no text.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        tok = self._tok
        if not 0 <= token_id < tok.vocab_size:
            return "", []
        if tok.is_byte(token_id):
            b = int(tok.id_to_piece(token_id)[3:5], 16)
            return (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"), [b]
        text = tok.id_to_piece(token_id).replace("\u2581", " ")
        return text, list(text.encode("utf-8"))


def chat_logprobs(records: Sequence[TokenRecord], texts: TokenTexts) -> ChoiceLogprobs:
    """OpenAI chat `logprobs` ({content: [...], refusal: null})."""
    content = []
    for r in records:
        token, raw = texts(r.token_id)
        tops = [TopLogprob(token=texts(i)[0], logprob=lp, bytes=texts(i)[1]) for i, lp in r.top]
        content.append(TokenLogprob(token=token, logprob=r.logprob, bytes=raw, top_logprobs=tops))
    return ChoiceLogprobs(content=content)


def completion_logprobs(records: Sequence[TokenRecord], texts: TokenTexts, offset: int = 0) -> CompletionLogprobs:
    """Legacy completions `logprobs` (parallel lists; top as {token: logprob})."""
    out = CompletionLogprobs()
    for r in records:
        out.tokens.append(texts(r.token_id)[0])
        out.token_logprobs.append(r.logprob)
        out.text_offset.append(offset + r.text_offset)
        out.top_logprobs.append({texts(i)[0]: lp for i, lp in r.top})
    return out
