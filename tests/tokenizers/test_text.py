"""TextTokenizer / IncrementalDetokenizer against the reference tokenizer battery."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_serve.tokenizers.text import (
    IncrementalDetokenizer,
    TextTokenizer,
    TokenizerError,
    read_normalizer_spec,
)

REFERENCE = Path(__file__).parents[1] / "fixtures" / "lwm_reference"
BATTERY = json.loads((REFERENCE / "cases" / "tokenizer" / "tokenizer_cases.json").read_text("utf-8"))
CASES = BATTERY["cases"]
CASE_IDS = [f"{i}:{c['text'][:24]!r}" for i, c in enumerate(CASES)]
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")


@pytest.fixture(scope="module")
def tok(reference_dir: Path) -> TextTokenizer:
    return TextTokenizer(reference_dir / "tokenizer")


# ------------------------------------------------------------- the battery
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encode_matches_reference(tok: TextTokenizer, case: dict) -> None:
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encode_without_bos_matches_reference(tok: TextTokenizer, case: dict) -> None:
    assert tok.encode(case["text"], add_bos=False) == case["ids_add_special_tokens_false"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tokens_match_reference(tok: TextTokenizer, case: dict) -> None:
    assert tok.tokenize(case["text"]) == case["tokens"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_matches_reference(tok: TextTokenizer, case: dict) -> None:
    assert tok.decode(case["ids"]) == case["decode"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_incremental_matches_reference_skip_decode(tok: TextTokenizer, case: dict) -> None:
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in case["ids"]] + [detok.finish()]
    assert "".join(deltas) == case["decode_skip_special"]
    assert detok.num_tokens == len(case["ids"])


def test_special_ids_and_sizes_match_reference(tok: TextTokenizer) -> None:
    info = BATTERY["info"]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (
        info["bos_token_id"],
        info["eos_token_id"],
        info["unk_token_id"],
        info["pad_token_id"],
    )
    assert tok.vocab_size == info["vocab_size"]
    assert tok.encode("<vision>") == info["vision_start_ids"]
    assert tok.encode("</vision>") == info["vision_end_ids"]
    assert tok.encode(" ASSISTANT:") == info["assistant_tail_ids"]


def _generated_cases() -> list[tuple[str, list[int], str]]:
    out = []
    for path in sorted((REFERENCE / "cases").glob("*/case.json")):
        case = json.loads(path.read_text("utf-8"))
        if "output_ids" in case and "output_text" in case:
            for row, (ids, text) in enumerate(zip(case["output_ids"], case["output_text"], strict=True)):
                out.append((f"{path.parent.name}[{row}]", ids, text))
    return out


GENERATED = _generated_cases()


def test_generated_cases_found() -> None:
    assert len(GENERATED) >= 3


@pytest.mark.parametrize("name,ids,text", GENERATED, ids=[g[0] for g in GENERATED])
def test_decode_of_generated_ids_matches_reference_output_text(
    tok: TextTokenizer, name: str, ids: list[int], text: str
) -> None:
    # The reference cuts its output at the first EOS.
    cut = ids.index(tok.eos_id) if tok.eos_id in ids else len(ids)
    assert tok.decode(ids[:cut], skip_special_tokens=True) == text
    detok = IncrementalDetokenizer(tok)
    assert detok.add_many(ids[:cut]) + detok.finish() == text


# ----------------------------------------------------- incremental property
def _ids(vocab_size: int) -> st.SearchStrategy[list[int]]:
    one = st.one_of(
        st.integers(0, 2),  # specials
        st.integers(3, 258),  # byte pieces
        st.integers(0xE4 + 3, 0xF0 + 3),  # lead bytes of 3/4-byte characters
        st.integers(0x80 + 3, 0xBF + 3),  # continuation bytes
        st.integers(0, vocab_size - 1),
        st.integers(vocab_size, vocab_size + 3),  # past the vocabulary: dropped
    )
    return st.lists(one, max_size=40)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_incremental_deltas_join_to_full_decode(tok: TextTokenizer, data: st.DataObject, skip: bool) -> None:
    ids = data.draw(_ids(tok.vocab_size))
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        emitted += detok.add(token_id)
        flushed = (
            token_id < tok.vocab_size
            and not tok.is_byte(token_id)
            and not (skip and token_id in tok.special_ids)
        )
        if flushed:
            # Liveness: after a token that ends any byte run, all text is out.
            assert emitted == tok.decode(ids[:n], skip_special_tokens=skip)
            assert not detok.has_pending
    emitted += detok.finish()
    full = tok.decode(ids, skip_special_tokens=skip)
    assert emitted == full  # hence every U+FFFD in a delta is one of the full decode's


def test_incremental_holds_bytes_until_the_run_ends(tok: TextTokenizer) -> None:
    ids = tok.encode("a 🤖 b", add_bos=False)
    byte_positions = [i for i, t in enumerate(ids) if tok.is_byte(t)]
    assert len(byte_positions) == 4
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(t) for t in ids]
    assert all(deltas[i] == "" for i in byte_positions)
    assert "🤖" in deltas[byte_positions[-1] + 1]
    assert "".join(deltas) + detok.finish() == "a 🤖 b"


def test_incremental_invalid_run_becomes_one_replacement_per_byte(tok: TextTokenizer) -> None:
    lead, cont = tok.piece_to_id("<0xE4>"), tok.piece_to_id("<0xBD>")
    word = tok.encode("word", add_bos=False)
    ids = [lead, cont, lead] + word  # a 3-byte run that is not valid UTF-8
    detok = IncrementalDetokenizer(tok)
    out = detok.add_many(ids) + detok.finish()
    assert out == tok.decode(ids, skip_special_tokens=True) == "\ufffd" * 3 + " word"


def test_incremental_strips_only_the_first_leading_space(tok: TextTokenizer) -> None:
    space = tok.piece_to_id("▁")
    word = tok.encode("a", add_bos=False)
    ids = [tok.bos_id, space] + word
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(t) for t in ids]
    assert deltas[:2] == ["", ""]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == " a"


# ------------------------------------------------------------- round trips
def _expected_decode(text: str, skip_special: bool) -> str:
    """The legacy law: each text segment between specials gains one leading space,
    '▁' reads back as a space, one leading space of the whole is dropped."""
    pattern = "(" + "|".join(re.escape(s) for s in SPECIAL_TEXTS) + ")"
    parts = []
    for segment in re.split(pattern, text):
        if segment in SPECIAL_TEXTS:
            parts.append("" if skip_special else segment)
        elif segment:
            parts.append(" " + segment.replace("▁", " "))
    out = "".join(parts)
    return out[1:] if out.startswith(" ") else out


_text_with_specials = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXTS + ("▁", " ", "\n"))), max_size=6
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_text_with_specials, skip=st.booleans())
def test_encode_decode_round_trip_law(tok: TextTokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert ids[1:] == tok.encode(text, add_bos=False)
    assert tok.decode(ids[1:], skip_special_tokens=skip) == _expected_decode(text, skip)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_round_trip_is_identity_on_plain_text(tok: TextTokenizer, text: str) -> None:
    plain = text.replace("▁", " ")
    for special in SPECIAL_TEXTS:
        plain = plain.replace(special, "")
    assert tok.decode(tok.encode(plain), skip_special_tokens=True) == plain


# ------------------------------------------------------ loading and errors
def test_model_file_path_loads_the_directory_config(reference_dir: Path) -> None:
    by_file = TextTokenizer(reference_dir / "tokenizer" / "tokenizer.model")
    assert by_file.pad_id == 0
    assert by_file.encode("<s>hello") == TextTokenizer(reference_dir / "tokenizer").encode("<s>hello")


def test_config_with_added_token_dicts_and_null_pad(reference_dir: Path, tmp_path: Path) -> None:
    shutil.copy(reference_dir / "tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")

    def added(content: str) -> dict:  # the AddedToken form of LWM-Text-1M's real config
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    config = {"bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>"), "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)


def test_missing_model_raises(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no SentencePiece model"):
        TextTokenizer(tmp_path)


def test_garbage_model_raises(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\xff" * 64)
    with pytest.raises(TokenizerError):
        TextTokenizer(tmp_path)


def test_unknown_special_token_raises(reference_dir: Path, tmp_path: Path) -> None:
    shutil.copy(reference_dir / "tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TokenizerError, match="<pad>"):
        TextTokenizer(tmp_path)


def test_bad_ids(tok: TextTokenizer) -> None:
    with pytest.raises(TokenizerError):
        tok.decode([5, -1])
    with pytest.raises(TokenizerError):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(TokenizerError):
        tok.piece_to_id("no such piece")
    # Ids past the vocabulary are dropped, as the reference's decode does.
    assert tok.decode([tok.vocab_size + 5] + tok.encode("hi", add_bos=False)) == "hi"


def _train(tmp_path: Path, **options: object) -> Path:
    model = tmp_path / "tokenizer.model"
    with model.open("wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["hello world", "a quick test of words", "hello there world"] * 5),
            model_writer=f,
            model_type="bpe",
            vocab_size=300,
            byte_fallback=True,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
            **options,
        )
    return model


def test_whitespace_squeezing_model_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _train(tmp_path, normalization_rule_name="identity", remove_extra_whitespaces=True)
    assert read_normalizer_spec(model.read_bytes()).remove_extra_whitespaces
    with pytest.raises(TokenizerError, match="remove_extra_whitespaces"):
        TextTokenizer(model)
    with caplog.at_level(logging.WARNING):
        TextTokenizer(model, strict=False)
    assert "remove_extra_whitespaces" in caplog.text


def test_model_without_dummy_prefix_still_gets_the_legacy_prefix(tmp_path: Path) -> None:
    model = _train(
        tmp_path, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False
    )
    assert not read_normalizer_spec(model.read_bytes()).add_dummy_prefix
    tok = TextTokenizer(model)
    pieces = tok.tokenize("hello<s>world", add_bos=False)
    assert pieces[0].startswith("▁")
    assert pieces[pieces.index("<s>") + 1].startswith("▁")
    assert tok.decode(tok.encode("hello  world"), skip_special_tokens=True) == "hello  world"


def test_placeholders_of_unknown_ids_read_back_as_those_ids(reference_dir: Path) -> None:
    """Random benchmark weights sample ids past the vocabulary; their placeholders, sent
    back as the assistant's turn of a conversation, must read as the same ids, or a
    follow-up question costs ~10 tokens per such id instead of one (and misses the
    prefix cache of real text)."""
    tok = TextTokenizer(reference_dir / "tokenizer")
    v = tok.vocab_size
    tok.unknown_id_text = " <id:{id}>"
    reply = [v + 3, v + 4, v + 99]
    text = tok.decode(reply)
    assert text == f"<id:{v + 3}> <id:{v + 4}> <id:{v + 99}>"
    assert tok.encode(text, add_bos=False) != reply  # no limit set: placeholders are ordinary text
    tok.unknown_id_limit = v + 100
    assert tok.encode(text, add_bos=False) == reply
    # between placeholders, text is encoded segment by segment, as around a special token
    mixed = tok.encode("<s>Hi" + text + " there", add_bos=False)
    assert mixed == [tok.bos_id] + tok._encode_text("Hi") + reply + tok._encode_text(" there")
    # ids the tokenizer knows, or past the model's vocabulary, are never written so: text
    for literal in (f"<id:{v - 1}>", f"<id:{v + 100}>", "<id:>"):
        assert tok.encode(literal, add_bos=False) == tok._encode_text(literal)
