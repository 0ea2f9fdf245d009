"""Builds the text tokenizer of the embedded demo model, offline and deterministically.

A SentencePiece BPE model with the conventions of the reference fixture
tokenizer (and of LLaMA's): vocab 512, byte fallback (ids 3..258 are the byte
pieces `<0x00>`..`<0xFF>`), split digits, identity normalization, dummy prefix,
no whitespace squeezing, `<unk>`=0, `<s>`=1, `</s>`=2, no pad piece. Trained on
`data/demo_corpus.txt` (plain English about videos, images and assistants plus
the LWM prompt words). `<vision>`/`</vision>` stay ordinary text, as in LLaMA.

Training runs single-threaded from an in-memory sentence iterator (so no file
path is recorded in the model), which makes two builds byte-identical.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import sentencepiece as spm

from lwm_serve.tokenizers.text import CONFIG_FILE, MODEL_FILE, SPECIAL_TOKENS_MAP_FILE

logger = logging.getLogger(__name__)

DEMO_VOCAB_SIZE = 512
DEMO_CORPUS = Path(__file__).parent / "data" / "demo_corpus.txt"
_SEED = 20240213  # fixed seed for SentencePiece's global random generator

_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    # Same choice as the fixture tokenizer: prompts are left padded with id 0.
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "sp_model_kwargs": {},
}
_SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def train_demo_model(corpus: Path = DEMO_CORPUS, vocab_size: int = DEMO_VOCAB_SIZE) -> bytes:
    """Trains the demo SentencePiece model and returns its serialized bytes.

    Args:
        corpus: UTF-8 text, one sentence per line.
        vocab_size: number of pieces (3 specials + 256 bytes + learned pieces).

    Returns:
        The `tokenizer.model` bytes.
    """
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    spm.set_random_generator_seed(_SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,  # keep the trainer's stderr chatter out of logs and tests
    )
    return model.getvalue()


def build_demo_tokenizer(out_dir: Path, corpus: Path = DEMO_CORPUS) -> Path:
    """Writes the demo tokenizer directory.

    Args:
        out_dir: created if missing; receives `tokenizer.model`,
            `tokenizer_config.json` and `special_tokens_map.json`.

    Returns:
        `out_dir`, loadable with `TextTokenizer(out_dir)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(train_demo_model(corpus))
    (out_dir / CONFIG_FILE).write_text(json.dumps(_TOKENIZER_CONFIG, indent=1) + "\n", encoding="utf-8")
    (out_dir / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(_SPECIAL_TOKENS_MAP, indent=1) + "\n", encoding="utf-8")
    logger.info("built demo tokenizer (vocab %d) in %s", DEMO_VOCAB_SIZE, out_dir)
    return out_dir
