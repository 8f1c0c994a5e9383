"""Tokenizer and IncrementalDetokenizer on a small byte-level BPE trained here, with Qwen's special tokens."""

import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from qnext.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerNotFoundError

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special: skipped by decode(skip_special_tokens=True)
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # added but not special: Qwen keeps them in text
CORPUS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。这是一个测试。代码生成模型。",
    "Emoji: 😀 🎉 🚀 👍🏽 ❤️ — and accents: café, naïve, Ærøskøbing.",
    "日本語のテキストも少し。한국어도 조금.",
]
SAMPLES = [
    "Hi 😀 there 🎉🚀!",
    "你好世界 and 日本語",
    "👍🏽 café ❤️ naïve",
    "def f():\n    return '你好' + \"😀\"",
]


def build_checkpoint(root):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "pad_token": {"content": "<|endoftext|>"},
                    "model_max_length": 4096})
    )
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    (root / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    )
    return root


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
    return Tokenizer.from_pretrained(build_checkpoint(tmp_path_factory.mktemp("tok")))


def test_special_token_ids(tk):
    im_end, eot = tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")
    assert tk.eos_token_id == im_end
    assert tk.eos_token_ids == (im_end, eot)
    assert tk.bos_token_id is None and tk.pad_token_id == eot
    assert tk.all_special_ids == {tk.token_to_id(t) for t in SPECIAL}
    assert tk.vocab_size == 400 + len(ADDED) == len(tk.get_vocab())
    assert tk.model_max_length == 4096
    assert tk.convert_ids_to_tokens([im_end]) == ["<|im_end|>"]
    assert tk.token_to_id("no such token") is None


def test_encode_decode_special_tokens(tk):
    text = "<|im_start|>user\nHi 😀<tool_call>你好</tool_call><|im_end|>"
    ids = tk.encode(text)
    for t in SPECIAL[1:] + ADDED[:2]:
        assert tk.token_to_id(t) in ids  # each special string becomes its single id
    assert tk.decode(ids, skip_special_tokens=False) == text
    assert tk.decode(ids) == "user\nHi 😀<tool_call>你好</tool_call>"
    assert tk.encode(text, add_special_tokens=True) == ids  # no post-processor: nothing added
    for s in SAMPLES:
        assert tk.decode(tk.encode(s)) == s
    assert tk.decode([tk.vocab_size + 10, *tk.encode("Hi")]) == "Hi"  # padded-vocab ids decode to nothing


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="prompt_token_ids"):
        Tokenizer.from_pretrained(tmp_path)


def stream(tk, ids, chunks=1, skip_special_tokens=True):
    det = IncrementalDetokenizer(tk, skip_special_tokens=skip_special_tokens)
    pieces = [det.add_tokens(ids[i : i + chunks]) for i in range(0, len(ids), chunks)]
    pieces.append(det.flush())
    return det, pieces


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_never_splits_a_character(tk, text):
    ids = tk.encode(text)
    assert any(tk.decode([i]).endswith("\ufffd") for i in ids)  # the tokenizer does split characters
    det, pieces = stream(tk, ids)
    assert "".join(pieces) == text == det.output_text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # held back at least once


def test_streaming_random_ids_join_to_full_decode(tk):
    rng = random.Random(0)
    for trial in range(60):
        ids = [rng.randrange(tk.vocab_size + 3) for _ in range(rng.randrange(1, 40))]
        skip = trial % 2 == 0
        _, pieces = stream(tk, ids, chunks=rng.choice([1, 1, 2, 3]), skip_special_tokens=skip)
        assert "".join(pieces) == tk.decode(ids, skip_special_tokens=skip)


def test_streaming_same_pieces_with_and_without_the_concatenating_shortcut(tk):
    """Byte-level decoding concatenates, so the detokenizer derives the next window's prefix text instead of
    decoding it: the pieces must be exactly those of the general path."""
    assert tk.decode_concatenates
    rng = random.Random(1)
    text = " ".join(SAMPLES * 3)
    for trial in range(30):
        ids = tk.encode(text) if trial == 0 else [rng.randrange(tk.vocab_size + 3) for _ in range(60)]
        chunks = rng.choice([1, 1, 2, 3])
        fast = stream(tk, ids, chunks)[1]
        tk.decode_concatenates = False
        try:
            slow = stream(tk, ids, chunks)[1]
        finally:
            tk.decode_concatenates = True
        assert fast == slow


def test_streaming_special_tokens(tk):
    ids = tk.encode("<|im_start|>assistant\nok<tool_call>x</tool_call><|im_end|>")
    assert "".join(stream(tk, ids)[1]) == "assistant\nok<tool_call>x</tool_call>"
    assert "".join(stream(tk, ids, skip_special_tokens=False)[1]).startswith("<|im_start|>assistant")


def test_streaming_decodes_a_small_window(tk):
    lengths = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tk.decode(ids, skip_special_tokens)

    ids = tk.encode(" ".join(SAMPLES * 20))
    det = IncrementalDetokenizer(Spy())
    text = "".join(det.add_tokens([i]) for i in ids) + det.flush()
    assert text == tk.decode(ids) and len(ids) > 300
    assert max(lengths) <= 16  # a character or two of context, never the whole sequence
