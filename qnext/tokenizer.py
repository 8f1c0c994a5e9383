"""Tokenizer: a thin wrapper over the `tokenizers` library, plus IncrementalDetokenizer for streaming.

Special tokens come from the tokenizer's added tokens (those marked special are skipped by
`decode(skip_special_tokens=True)`; Qwen's <tool_call> etc. are added but not special, so they stay in text)
and from tokenizer_config.json (eos/bos/pad/unk token strings). `eos_token_ids` also includes the
eos ids of generation_config.json when the checkpoint has one (Qwen stops at <|im_end|> and <|endoftext|>).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders as _decoders

REPLACEMENT_CHAR = "\ufffd"


class TokenizerNotFoundError(FileNotFoundError):
    """The checkpoint has no tokenizer.json; callers must pass prompt_token_ids."""


def _token_str(v: Any) -> str | None:
    # tokenizer_config.json writes special tokens as "<x>" or {"content": "<x>", ...}
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _as_id_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None, extra_eos_ids: Iterable[int] = ()):
        self._tok = tokenizer
        self.config = dict(config or {})
        # Byte-level BPE (Qwen's) decodes token by token: decode(a + b) == decode(a) + decode(b) whenever a ends on
        # a whole UTF-8 character, which IncrementalDetokenizer uses to skip a decode per token.
        self.decode_concatenates = isinstance(tokenizer.decoder, _decoders.ByteLevel)
        self._added = {i: t for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.all_special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self.special_tokens = {
            name: tok
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (tok := _token_str(self.config.get(name))) is not None
        }
        self.model_max_length: int | None = self.config.get("model_max_length")
        ids = []
        if self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        ids += [i for i in extra_eos_ids if i not in ids]
        self._eos_ids = tuple(ids)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "Tokenizer":
        root = Path(checkpoint_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise TokenizerNotFoundError(
                f"no tokenizer.json in {root}: this checkpoint has no tokenizer, so requests must give "
                f"prompt_token_ids (text prompts, chat and stop strings need a tokenizer)"
            )
        config = _read_json(root / "tokenizer_config.json")
        gen_eos = _as_id_list(_read_json(root / "generation_config.json").get("eos_token_id"))
        return cls(_HFTokenizer.from_file(str(path)), config, gen_eos)

    # ---- ids of special tokens ------------------------------------------------------------------
    def _special_id(self, name: str) -> int | None:
        tok = self.special_tokens.get(name)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: tokenizer eos first, then generation_config.json's."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (the model's vocab_size may be padded larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- text <-> ids -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Special-token strings in `text` (e.g. a rendered chat's <|im_start|>) map to their ids.
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Ids outside the tokenizer's vocabulary (padded lm_head rows) decode to nothing.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, id_lists: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in id_lists], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


class IncrementalDetokenizer:
    """Streams text for a growing list of token ids.

    Invariants: the pieces returned by `add_tokens` and `flush` join to exactly
    `tokenizer.decode(all_ids, skip_special_tokens)`; no piece ends inside a UTF-8 character.
    Cost per step is a decode of a short window: `decode(ids[prefix:])` minus the already-emitted
    `decode(ids[prefix:read])` (the prefix gives context to decoders that treat a leading space specially).
    A window only advances to a point where its text does not end in U+FFFD (an unfinished character);
    until then, the part before the trailing U+FFFD run is emitted and the rest held.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._concatenates = getattr(tokenizer, "decode_concatenates", False)
        self.token_ids: list[int] = []
        self._pieces: list[str] = []  # everything emitted so far (joined only when output_text is read)
        self._prefix = 0  # window start
        self._read = 0  # ids[prefix:read] decode to _prefix_text, all of it emitted
        self._prefix_text = ""
        self._emitted_past_read = 0  # chars of the window text beyond _prefix_text already emitted

    @property
    def output_text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_ids: Iterable[int]) -> str:
        """Append ids; return the newly finished text (may be "")."""
        self.token_ids.extend(new_ids)
        text = self._decode(self.token_ids[self._prefix :])
        start = len(self._prefix_text) + self._emitted_past_read
        if not text.endswith(REPLACEMENT_CHAR) and len(text) > len(self._prefix_text):
            piece = text[start:]
            # Advance: the old read point becomes the context start; the new read point is the end. The old window
            # text ends on a whole character, so with a concatenating decoder the new prefix text is its tail.
            self._prefix, self._read = self._read, len(self.token_ids)
            if self._concatenates:
                self._prefix_text = text[len(self._prefix_text):]
            else:
                self._prefix_text = self._decode(self.token_ids[self._prefix : self._read])
            self._emitted_past_read = 0
        else:
            stable = len(text.rstrip(REPLACEMENT_CHAR))
            piece = text[start:stable] if stable > start else ""
            self._emitted_past_read += len(piece)
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """At the end of the sequence: release held text (a trailing unfinished character decodes to U+FFFD)."""
        text = self._decode(self.token_ids[self._prefix :])
        piece = text[len(self._prefix_text) + self._emitted_past_read :]
        self._prefix, self._read = len(self.token_ids), len(self.token_ids)
        self._prefix_text, self._emitted_past_read = "", 0
        if piece:
            self._pieces.append(piece)
        return piece
