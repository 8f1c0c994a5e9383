"""The `random` dataset of `bench serve`: prompts of exact token counts, comparable with `vllm bench serve`.

Lengths are uniform in [L(1-r), L(1+r)]; an optional shared prefix of `prefix_len` tokens starts every prompt.
Random token ids are decoded to text, and the text re-encoded and trimmed until it re-encodes to exactly the asked
count (decoding and encoding do not round-trip token for token, so a plain decode would miss the length).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    prompt_len: int      # tokens, by the benchmark's tokenizer
    output_len: int


def _uniform_len(rng: random.Random, length: int, ratio: float) -> int:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return rng.randint(lo, hi)


def _exact_text(tokenizer, ids: list[int], want: int) -> tuple[str, int]:
    """Text that re-encodes to `want` tokens (or the closest reachable below it after a few tries)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(8):
        enc = tokenizer.encode(text)
        if len(enc) == want:
            return text, want
        if len(enc) > want:
            enc = enc[:want]
        else:
            enc = enc + ids[: want - len(enc)]
        text = tokenizer.decode(enc, skip_special_tokens=True)
    return text, len(tokenizer.encode(text))


def random_prompts(tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   prefix_len: int = 0, seed: int = 0) -> list[BenchPrompt]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = [i for i in range(tokenizer.vocab_size) if i not in special]
    prefix_ids = [rng.choice(pool) for _ in range(prefix_len)]
    prompts = []
    for _ in range(num_prompts):
        n_in = _uniform_len(rng, input_len, range_ratio)
        n_out = _uniform_len(rng, output_len, range_ratio)
        ids = prefix_ids + [rng.choice(pool) for _ in range(n_in)]
        text, n = _exact_text(tokenizer, ids, prefix_len + n_in)
        prompts.append(BenchPrompt(text=text, prompt_len=n, output_len=n_out))
    return prompts
