"""Stop strings and per-choice decoding (pure, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_serve.server.handlers.text_output import ChoiceDecoder, StopMatcher
from lwm_serve.tokenizers.text import TextTokenizer


def _feed_all(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    return out, m.matched


def _expected(stops: list[str], pieces: list[str]) -> str:
    """Generation stops at the first piece after which the text contains a stop string;
    the output is that text cut before its earliest stop string."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)]
    return text


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc\n ", max_size=30),
       stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_matcher_equals_truncating_at_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, matched = _feed_all(stops, pieces)
    assert out == _expected(stops, pieces)
    assert (matched is not None) == any(s in text for s in stops)
    if matched is not None:
        assert text[len(out):].startswith(matched)


def test_a_stop_completed_first_wins_over_a_longer_one_started_earlier():
    # After "ab" the text contains "b": generation stops there, "aba" is never produced.
    assert _feed_all(["b", "aba"], ["ab", "a"]) == ("a", "b")
    assert _feed_all(["b", "aba"], ["aba"]) == ("", "aba")


def test_stop_split_across_pieces_is_removed_and_nothing_after_it():
    m = StopMatcher(["END"])
    emitted = [m.feed("hello E"), m.feed("N"), m.feed("D and more"), m.feed("x")]
    assert emitted == ["hello ", "", "", ""]
    assert m.matched == "END" and m.flush() == ""


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_be_one():
    m = StopMatcher(["STOP"])
    assert m.feed("ab ST") == "ab "
    assert m.feed("AR") == "STAR"
    assert m.feed("S") == ""
    assert m.flush() == "S"
    assert m.matched is None


@pytest.fixture(scope="module")
def tok(reference_dir: Path) -> TextTokenizer:
    return TextTokenizer(reference_dir / "tokenizer")


def _ids(tok: TextTokenizer, text: str) -> list[int]:
    return tok.encode(text, add_bos=False)


def test_decoder_text_equals_decode_and_eos_ends_with_stop(tok):
    ids = _ids(tok, "The cat sat on the mat, déjà vu 😀.")
    dec = ChoiceDecoder(tok, [], [tok.eos_id], keep_logprobs=True)
    text = "".join(dec.add(t, -1.0) for t in ids) + dec.add(tok.eos_id) + dec.add(ids[0])
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert dec.finish_reason == "stop"
    assert dec.completion_tokens == len(ids) + 1  # the EOS counts; nothing after it does
    records = dec.take_logprobs()
    assert [r.token_id for r in records] == ids  # the EOS is not content
    assert dec.take_logprobs() == []


def test_decoder_stop_string_split_over_tokens(tok):
    full = "one two three four"
    ids = _ids(tok, full)
    dec = ChoiceDecoder(tok, ["ee f"], [tok.eos_id])
    text = "".join(dec.add(t) for t in ids) + dec.finish_length()
    assert text == full[:full.index("ee f")]
    assert dec.finish_reason == "stop"
    assert dec.completion_tokens < len(ids) + 1


def test_decoder_runs_out_of_tokens(tok):
    ids = _ids(tok, "a short answer")
    dec = ChoiceDecoder(tok, ["zzz"], [tok.eos_id])
    text = "".join(dec.add(t) for t in ids) + dec.finish_length()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert dec.finish_reason == "length"
    assert dec.completion_tokens == len(ids)
