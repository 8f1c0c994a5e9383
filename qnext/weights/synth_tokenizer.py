"""A byte-level BPE tokenizer for synthetic checkpoints, shaped like Qwen's.

Layout of a tokenizer of `size` entries: ids [0, size - 26) are the BPE vocabulary (256 byte symbols, merges learnt
from a fixed list of Python standard-library files, then unreachable filler entries when the corpus gives fewer merges
than asked), and the last 26 ids are Qwen's added tokens in Qwen's order, so a tokenizer of 151669 entries puts them at
Qwen's own ids (<|endoftext|> 151643, <|im_end|> 151645, <tool_call> 151657, ...). As in Qwen's tokenizer.json, the
tool/FIM/think tags are added tokens with special=false (skip_special_tokens keeps them, so tool-call text survives
decoding); the chat-control tokens are special=true.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# (content, special) in Qwen's id order; the first sits at tokenizer_size - 26.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
NUM_ADDED = len(QWEN_ADDED_TOKENS)
MIN_SIZE = 256 + 64 + NUM_ADDED  # byte alphabet + a few merges + added tokens

# Qwen2's pre-tokenizer split (letters runs, single digits, punctuation runs, newlines, spaces).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Fixed corpus: present in every CPython 3.11+; files missing from some build are skipped.
_CORPUS = ("argparse.py", "ast.py", "collections/__init__.py", "dataclasses.py", "difflib.py", "functools.py",
           "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py", "string.py", "textwrap.py",
           "typing.py", "subprocess.py", "tokenize.py", "enum.py", "random.py", "shutil.py", "tempfile.py",
           "heapq.py", "bisect.py", "contextlib.py")
MAX_TRAINED = 8192  # learnt entries at most; more would only slow training on this small corpus


def special_token_ids(size: int) -> dict[str, int]:
    """Id of each Qwen added token in a synthetic tokenizer of `size` entries."""
    base = size - NUM_ADDED
    return {content: base + i for i, (content, _) in enumerate(QWEN_ADDED_TOKENS)}


def _corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text(encoding="utf-8") for f in _CORPUS if (root / f).is_file()]
    if not texts:
        raise RuntimeError(f"no training text found under {root}")
    return texts


def build_tokenizer(size: int, texts: list[str] | None = None) -> Tokenizer:
    """Deterministic byte-level BPE tokenizer with exactly `size` entries (see module doc).

    texts: the training corpus (the demo model's trainer passes its own); default: a fixed set of stdlib files,
    of which at most MAX_TRAINED entries are learnt.
    """
    if size < MIN_SIZE:
        raise ValueError(f"tokenizer size must be >= {MIN_SIZE}, got {size}")
    base = size - NUM_ADDED
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trained = base if texts is not None else min(base, MAX_TRAINED)
    trainer = trainers.BpeTrainer(vocab_size=trained, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts if texts is not None else _corpus(), trainer=trainer)

    # Fill the BPE vocabulary up to `base` with entries no merge produces, then add Qwen's tokens at fixed ids.
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for i in range(len(vocab), base):
        vocab[f"<|extra_{i}|>"] = i
    spec["added_tokens"] = [
        {"id": base + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, (content, special) in enumerate(QWEN_ADDED_TOKENS)
    ]
    out = Tokenizer.from_str(json.dumps(spec))
    assert out.get_vocab_size(with_added_tokens=True) == size, "synthetic tokenizer size mismatch"
    return out


def tokenizer_config(size: int, model_max_length: int) -> dict:
    """tokenizer_config.json in Qwen's form: no bos prepended, eos <|im_end|>, pad <|endoftext|>."""
    ids = special_token_ids(size)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": special}
            for content, special in QWEN_ADDED_TOKENS
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
