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


def _exact_texts(tokenizer, id_lists: list[list[int]], wants: list[int]) -> list[tuple[str, int]]:
    """For each ids / want: text that re-encodes to `want` tokens (or the closest reachable below it after a few
    tries). Every prompt goes through the same steps as alone; the batch only shares the tokenizer calls, which run
    on the Rust tokenizer's threads (one call per prompt made 512 prompts of 8K tokens in ~2 min on the GPU
    machine's host, ~24 s batched)."""
    texts = tokenizer.decode_batch(id_lists, skip_special_tokens=True)
    out: list[tuple[str, int] | None] = [None] * len(texts)
    pending = list(range(len(texts)))
    for _ in range(8):
        if not pending:
            break
        retry = []
        for i, enc in zip(pending, tokenizer.encode_batch([texts[i] for i in pending])):
            want = wants[i]
            if len(enc) == want:
                out[i] = (texts[i], want)
            else:
                retry.append((i, enc[:want] if len(enc) > want else enc + id_lists[i][: want - len(enc)]))
        pending = [i for i, _ in retry]
        for i, text in zip(pending, tokenizer.decode_batch([enc for _, enc in retry], skip_special_tokens=True)):
            texts[i] = text
    for i, enc in zip(pending, tokenizer.encode_batch([texts[i] for i in pending])):
        out[i] = (texts[i], len(enc))
    return out


def random_prompts(tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   prefix_len: int = 0, seed: int = 0) -> list[BenchPrompt]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = [i for i in range(tokenizer.vocab_size) if i not in special]
    prefix_ids = [rng.choice(pool) for _ in range(prefix_len)]
    id_lists, wants, out_lens = [], [], []
    for _ in range(num_prompts):
        n_in = _uniform_len(rng, input_len, range_ratio)
        out_lens.append(_uniform_len(rng, output_len, range_ratio))
        id_lists.append(prefix_ids + [rng.choice(pool) for _ in range(n_in)])
        wants.append(prefix_len + n_in)
    return [BenchPrompt(text=text, prompt_len=n, output_len=n_out)
            for (text, n), n_out in zip(_exact_texts(tokenizer, id_lists, wants), out_lens)]
