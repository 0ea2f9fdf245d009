"""The embedded demo model's tokenizer: built offline, deterministic, reference conventions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_serve.tokenizers import chat_template as ct
from lwm_serve.tokenizers.demo_tokenizer import DEMO_CORPUS, DEMO_VOCAB_SIZE, build_demo_tokenizer
from lwm_serve.tokenizers.text import TextTokenizer, read_normalizer_spec


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return TextTokenizer(build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok")))


def test_build_writes_a_loadable_directory(tmp_path: Path) -> None:
    out = build_demo_tokenizer(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tok = TextTokenizer(out)
    assert tok.vocab_size == DEMO_VOCAB_SIZE
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert [tok.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    spec = read_normalizer_spec((out / "tokenizer.model").read_bytes())
    assert (spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces) == ("identity", True, False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] and not config["add_eos_token"]


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    a = build_demo_tokenizer(tmp_path / "a")
    b = build_demo_tokenizer(tmp_path / "b")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_demo_tokenizer_learned_the_prompt_words(demo: TextTokenizer) -> None:
    tok = demo
    pieces = tok.tokenize("You are a helpful assistant. USER: ASSISTANT:", add_bos=False)
    assert not any(tok.is_byte(tok.piece_to_id(p)) for p in pieces)
    assert len(pieces) < len("You are a helpful assistant. USER: ASSISTANT:") // 2
    digits = tok.tokenize("12345", add_bos=False)
    assert all(len(p.strip("▁")) <= 1 for p in digits)  # split_digits
    row = ct.chat_prompt(tok, "What is in the picture?")
    assert row.ids[:2] == [tok.bos_id, tok.bos_id]
    assert DEMO_CORPUS.is_file()


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_demo_round_trip(demo: TextTokenizer, text: str) -> None:
    tok = demo
    plain = text.replace("▁", " ")
    for special in ("<s>", "</s>", "<unk>"):
        plain = plain.replace(special, "")
    assert tok.decode(tok.encode(plain), skip_special_tokens=True) == plain
