"""SentencePiece text tokenizer that reproduces the reference's Hugging Face tokenizer.

LWM loads its tokenizer with `AutoTokenizer.from_pretrained(dir)` on a directory
holding only `tokenizer.model` + `tokenizer_config.json`, which gives the FAST
`LlamaTokenizerFast` converted on the fly in its *legacy* form. `TextTokenizer`
reproduces that object's `encode`/`decode` exactly without transformers:

Encode (`encode(text)`):
  1. Split `text` on the literal special tokens (`<s>`, `</s>`, `<unk>`, the pad
     token, any `additional_special_tokens`); each match becomes its id.
  2. Every non-empty piece of text between them is normalized on its own as
     `'▁' + piece.replace(' ', '▁')` (the legacy Prepend + Replace normalizer; no
     pre-tokenizer) and BPE-encoded with byte fallback. SentencePiece's own
     encoder does exactly this for an `identity` normalizer with
     `add_dummy_prefix` and no whitespace squeezing (LLaMA's settings), so the
     C++ encoder is used; other normalizer settings are rejected (`strict`).
     Hence `a<s>b` -> `▁a <s> ▁b` and `hello </s> world` -> `... ▁ </s> ▁▁ wor ld`.
  3. BOS is prepended (unless `add_bos=False`); EOS is never appended.

Decode (`decode(ids, skip_special_tokens)`), the legacy decoder chain:
  1. ids -> pieces; special ids are dropped first when `skip_special_tokens`.
  2. `▁` -> space in every piece.
  3. Each maximal run of consecutive byte pieces (`<0xE4>`...) becomes its UTF-8
     text if the WHOLE run is valid UTF-8, else one U+FFFD per byte of the run.
     (Skipped specials do not break a run, kept ones do.)
  4. Pieces are joined and ONE leading space of the result is removed.

`IncrementalDetokenizer` streams the same decode token by token in O(1) per
token; see its docstring for the contract.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm

logger = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(ValueError):
    """The tokenizer files are missing or unusable, or an id is invalid."""


@dataclasses.dataclass(frozen=True)
class NormalizerSpec:
    """The fields of SentencePiece's `NormalizerSpec` that change encoding.

    Defaults are the protobuf defaults (used when a field is absent).
    """

    name: str = ""
    has_charsmap: bool = False
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise TokenizerError("truncated protobuf varint in tokenizer.model")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """Yields (field number, wire type, value) of one protobuf message level."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire} in tokenizer.model")
        yield field, wire, value


def read_normalizer_spec(model_proto: bytes) -> NormalizerSpec:
    """Reads `ModelProto.normalizer_spec` (field 3) without needing protobuf.

    Args:
        model_proto: the bytes of a SentencePiece `tokenizer.model`.

    Returns:
        The normalizer settings that decide how text is turned into pieces.
    """
    spec = NormalizerSpec()
    for field, wire, value in _proto_fields(model_proto):
        if field != 3 or wire != 2:
            continue
        for sub, sub_wire, sub_value in _proto_fields(value):
            if sub == 1 and sub_wire == 2:
                spec = dataclasses.replace(spec, name=sub_value.decode("utf-8"))
            elif sub == 2 and sub_wire == 2:
                spec = dataclasses.replace(spec, has_charsmap=len(sub_value) > 0)
            elif sub == 3 and sub_wire == 0:
                spec = dataclasses.replace(spec, add_dummy_prefix=bool(sub_value))
            elif sub == 4 and sub_wire == 0:
                spec = dataclasses.replace(spec, remove_extra_whitespaces=bool(sub_value))
            elif sub == 5 and sub_wire == 0:
                spec = dataclasses.replace(spec, escape_whitespaces=bool(sub_value))
    return spec


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config: a string, an AddedToken dict or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"cannot read special token entry {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


class TextTokenizer:
    """LLaMA SentencePiece tokenizer with the reference's (HF legacy fast) behaviour.

    Attributes:
        bos_id, eos_id, unk_id: special ids (from the config, else the model).
        pad_id: id of the config's `pad_token`, None when it declares none.
        vocab_size: number of pieces (text vocabulary size).
        special_ids: ids dropped by `decode(..., skip_special_tokens=True)`.
    """

    def __init__(self, path: str | Path, *, strict: bool = True) -> None:
        """Loads a tokenizer directory or a `tokenizer.model` path.

        Args:
            path: a directory with `tokenizer.model` (+ optional
                `tokenizer_config.json` / `special_tokens_map.json`), or the
                `.model` file itself (its directory's JSON files are read too).
            strict: raise `TokenizerError` when the model's normalizer would
                make SentencePiece disagree with the reference tokenizer;
                when False only a warning is logged.

        Raises:
            TokenizerError: missing or unreadable files, unknown special tokens.
        """
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise TokenizerError(f"no SentencePiece model at {model_path}")
        model_proto = model_path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{model_path} is not a SentencePiece model: {exc}") from exc
        spec = read_normalizer_spec(model_proto)
        self._check_normalizer(spec, model_path, strict)
        # Without the model's own dummy prefix, a leading space gives the same '▁'.
        self._add_space = not spec.add_dummy_prefix

        config: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_MAP_FILE, CONFIG_FILE):  # the config wins
            if (model_path.parent / name).is_file():
                config.update(_read_json(model_path.parent / name))

        self.vocab_size: int = self._sp.GetPieceSize()
        # Text for ids past the vocabulary (None: dropped, as the reference does).
        # Random benchmark weights (`--load-format dummy`) sample such ids all the
        # time; there they read as " <id:N>" so streams still carry one piece per token.
        self.unknown_id_text: str | None = None
        # Placeholders of ids below this (the model's vocabulary) encode back to their
        # ids; 0: never (a placeholder in a prompt is then ordinary text).
        self.unknown_id_limit: int = 0
        self._placeholder: tuple[str | None, re.Pattern[str] | None] = (None, None)
        self._pieces: list[str] = [self._sp.IdToPiece(i) for i in range(self.vocab_size)]
        self._piece_ids: dict[str, int] = {p: i for i, p in enumerate(self._pieces)}

        def special(key: str, fallback: int) -> int | None:
            if key in config:
                content = _token_content(config[key])
                return None if content is None else self._require_piece(content, key)
            return fallback if fallback >= 0 else None

        bos, eos, unk = (
            special("bos_token", self._sp.bos_id()),
            special("eos_token", self._sp.eos_id()),
            special("unk_token", self._sp.unk_id()),
        )
        if bos is None or eos is None:
            raise TokenizerError(f"{model_path.parent} defines no BOS/EOS token")
        self.bos_id: int = bos
        self.eos_id: int = eos
        self.unk_id: int | None = unk
        self.pad_id: int | None = special("pad_token", -1)

        specials = {i for i in (bos, eos, unk, self.pad_id) if i is not None}
        # The converted fast tokenizer registers the model's control/unknown
        # pieces as special added tokens too.
        specials |= {
            i for i in range(self.vocab_size) if self._sp.IsControl(i) or self._sp.IsUnknown(i)
        }
        for entry in config.get("additional_special_tokens", None) or []:
            content = _token_content(entry)
            if content is not None:
                specials.add(self._require_piece(content, "additional_special_tokens"))
        self.special_ids: frozenset[int] = frozenset(specials)
        special_texts = sorted({self._pieces[i] for i in specials}, key=len, reverse=True)
        # Longest first: the HF added-vocabulary matcher is leftmost-longest.
        self._special_re = re.compile("|".join(re.escape(s) for s in special_texts))

        # Decode tables: text of each piece (▁ -> space) and its byte value (-1: none).
        self._texts: list[str] = [p.replace("▁", " ") for p in self._pieces]
        self._bytes: list[int] = [
            int(m.group(1), 16) if (m := _BYTE_PIECE.fullmatch(p)) else -1 for p in self._pieces
        ]
        logger.info(
            "loaded tokenizer %s: vocab %d, bos %d, eos %d, pad %s",
            model_path, self.vocab_size, self.bos_id, self.eos_id, self.pad_id,
        )

    @staticmethod
    def _check_normalizer(spec: NormalizerSpec, model_path: Path, strict: bool) -> None:
        problems = []
        if spec.has_charsmap or spec.name not in ("identity", ""):
            problems.append(f"normalizer {spec.name!r} (reference uses none)")
        if spec.remove_extra_whitespaces:
            problems.append("remove_extra_whitespaces=true (reference keeps every space)")
        if not spec.escape_whitespaces:
            problems.append("escape_whitespaces=false")
        if not problems:
            return
        message = f"{model_path}: encoding would differ from the reference: " + "; ".join(problems)
        if strict:
            raise TokenizerError(message)
        logger.warning("%s", message)

    def _require_piece(self, content: str, what: str) -> int:
        if content not in self._piece_ids:
            raise TokenizerError(f"{what} {content!r} is not a piece of the vocabulary")
        return self._piece_ids[content]

    # ----------------------------------------------------------------- encode
    def _encode_text(self, text: str) -> list[int]:
        """Ids of one special-free piece of text, with the legacy '▁' prefix."""
        if not text:
            return []
        return self._sp.EncodeAsIds(" " + text if self._add_space else text)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, exactly as the reference's `tokenizer.encode`.

        Args:
            text: any string; literal special tokens (`<s>` ...) become their ids.
                Placeholders of `unknown_id_text` for ids in
                [vocab_size, unknown_id_limit) become those ids again.
            add_bos: prepend BOS (the reference always does; False gives
                `encode(text, add_special_tokens=False)`).

        Returns:
            The ids, BOS first when `add_bos`; never EOS.
        """
        ids = [self.bos_id] if add_bos else []
        placeholder = self._unknown_id_re()
        if placeholder is None:
            return ids + self._encode_specials(text)
        start = 0
        for match in placeholder.finditer(text):
            token_id = int(match.group("id"))
            if not self.vocab_size <= token_id < self.unknown_id_limit:
                continue  # not an id this tokenizer writes a placeholder for: ordinary text
            ids += self._encode_specials(text[start : match.start()])
            ids.append(token_id)
            start = match.end()
        return ids + self._encode_specials(text[start:])

    def _unknown_id_re(self) -> re.Pattern[str] | None:
        """The pattern of `unknown_id_text` (its leading spaces optional: decode drops
        the first one), so that a reply of random benchmark weights sent back in a
        conversation reads as the ids it came from, as real text does."""
        fmt = self.unknown_id_text
        if fmt is None or self.unknown_id_limit <= self.vocab_size:
            return None
        if self._placeholder[0] != fmt:
            before, _, after = fmt.partition("{id}")
            body = before.lstrip(" ")
            pattern = f" {{0,{len(before) - len(body)}}}{re.escape(body)}(?P<id>\\d+){re.escape(after)}"
            self._placeholder = (fmt, re.compile(pattern))
        return self._placeholder[1]

    def _encode_specials(self, text: str) -> list[int]:
        """Ids of text that may hold literal special tokens."""
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids += self._encode_text(text[start : match.start()])
            ids.append(self._piece_ids[match.group()])
            start = match.end()
        return ids + self._encode_text(text[start:])

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[str]:
        """The pieces of `encode(text)` (the reference's `tokens`)."""
        return [self._pieces[i] for i in self.encode(text, add_bos=add_bos)]

    # ----------------------------------------------------------------- decode
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of `token_id` (e.g. `▁You`, `<0x0A>`, `<s>`)."""
        self._check_id(token_id)
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int:
        """The id of a vocabulary piece; raises TokenizerError when absent."""
        return self._require_piece(piece, "piece")

    def is_byte(self, token_id: int) -> bool:
        """True for byte-fallback pieces `<0x00>`..`<0xFF>`."""
        self._check_id(token_id)
        return self._bytes[token_id] >= 0

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size})")

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, exactly as the reference's `tokenizer.decode`.

        Ids at or past `vocab_size` are dropped, as the reference does (or
        written as `unknown_id_text` when that is set).

        Args:
            ids: token ids (any int sequence or 1-D array).
            skip_special_tokens: drop `special_ids` instead of writing `<s>` etc.

        Returns:
            The text; one leading space (from the dummy prefix) removed.

        Raises:
            TokenizerError: a negative id.
        """
        parts: list[str] = []
        run = bytearray()  # pending run of byte pieces
        for raw in ids:
            token_id = int(raw)
            if token_id < 0:
                raise TokenizerError(f"negative token id {token_id}")
            if token_id >= self.vocab_size and self.unknown_id_text is not None:
                if run:
                    parts.append(_decode_byte_run(run))
                    run.clear()
                parts.append(self.unknown_id_text.format(id=token_id))
                continue
            if token_id >= self.vocab_size or (skip_special_tokens and token_id in self.special_ids):
                continue
            byte = self._bytes[token_id]
            if byte >= 0:
                run.append(byte)
                continue
            if run:
                parts.append(_decode_byte_run(run))
                run.clear()
            parts.append(self._texts[token_id])
        if run:
            parts.append(_decode_byte_run(run))
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text


def _decode_byte_run(run: bytes | bytearray) -> str:
    """A run of byte-fallback pieces: its UTF-8 text, or U+FFFD per byte if invalid."""
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class IncrementalDetokenizer:
    """Streams `TextTokenizer.decode` one token id at a time.

    Contract: for the ids fed with `add` (the generated ids only, not the prompt),
    `"".join(deltas) + finish() == tokenizer.decode(ids, skip_special_tokens=...)`
    exactly, U+FFFD included. After a token that is not a byte piece (and not a
    skipped special), everything decoded so far has been emitted; a run of byte
    pieces is held back until the run ends, because the reference decodes a run
    as a whole and turns ALL of it into U+FFFD if any byte is invalid — so no
    delta ever holds a half character or a premature U+FFFD. The leading space
    of the first emitted text is dropped, as decode does. O(1) work per token.
    """

    def __init__(self, tokenizer: TextTokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._run = bytearray()
        self._started = False  # has any non-empty text passed the leading-space strip
        self._n_ids = 0

    @property
    def num_tokens(self) -> int:
        """How many ids were fed."""
        return self._n_ids

    def _emit(self, text: str) -> str:
        if not self._started and text:
            self._started = True
            if text.startswith(" "):
                return text[1:]
        return text

    def add(self, token_id: int) -> str:
        """Feeds one id; returns the text it completes (often "")."""
        tok = self._tok
        token_id = int(token_id)
        if token_id < 0:
            raise TokenizerError(f"negative token id {token_id}")
        self._n_ids += 1
        if token_id >= tok.vocab_size and tok.unknown_id_text is not None:
            text = tok.unknown_id_text.format(id=token_id)
        elif token_id >= tok.vocab_size or (self._skip and token_id in tok.special_ids):
            return ""
        else:
            byte = tok._bytes[token_id]
            if byte >= 0:
                self._run.append(byte)
                return ""
            text = tok._texts[token_id]
        if self._run:
            text = _decode_byte_run(self._run) + text
            self._run.clear()
        return self._emit(text)

    def add_many(self, ids: Iterable[int]) -> str:
        """Feeds several ids; returns their combined delta."""
        return "".join(self.add(i) for i in ids)

    def finish(self) -> str:
        """Flushes a pending byte run (call once the sequence is complete)."""
        if not self._run:
            return ""
        text = _decode_byte_run(self._run)
        self._run.clear()
        return self._emit(text)

    @property
    def has_pending(self) -> bool:
        """True when byte pieces are held back waiting for the run to end."""
        return bool(self._run)
