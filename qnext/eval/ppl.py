"""Perplexity of a checkpoint over text files, through qnext's own loader and model (the weight path under test).

Each document is tokenized, <|endoftext|> is put in front (as the training stream separates documents), and every
document token is scored exactly once: the document is cut into windows of at most `window` tokens, each window
starts with an empty cache (fresh GDN state, no KV) and repeats the last token of the previous window as its first
input, so window k scores its tokens 1.. from the tokens before them in the same window. Windows run through the
model in chunks of `chunk` tokens, continuing through the paged KV cache and GDN state as the engine's chunked
prefill does. Perplexity = exp(total NLL / scored tokens), token-weighted over all documents.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DOC_SEP = "<|endoftext|>"


@dataclass
class PplResult:
    nll: float           # summed negative log-likelihood, nats
    tokens: int          # scored tokens
    documents: int
    seconds: float       # forward + logits time (tokenization and loading excluded)

    @property
    def mean_nll(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def load_documents(paths: list[str | Path]) -> list[str]:
    """Text of each document: a folder gives each *.py under it (sorted); a file whose text holds lines of only
    <|endoftext|> (scripts/build_corpus.py's train.txt / heldout.txt) gives one document per part; any other
    file is one document."""
    docs: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.py") if f.is_file())
            if not files:
                raise FileNotFoundError(f"no *.py files under {p}")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs.extend(d for d in text.split(f"\n{DOC_SEP}\n") if d.strip())
    return docs


def score_tokens(model, cache, ids: list[int], window: int, chunk: int, block_size: int) -> tuple[float, int]:
    """(summed NLL, scored tokens) of ids[1:] given the tokens before each, over windows of `window` tokens.

    Uses state slot 0 and KV pages [0, ceil(window / block_size)) of `cache`: nothing else may use them meanwhile.
    """
    from qnext.engine.forward_batch import ForwardBatch

    device = cache.device
    pages = list(range(-(-window // block_size)))
    if len(pages) > cache.num_blocks:
        raise ValueError(f"a window of {window} tokens needs {len(pages)} KV pages, the cache has {cache.num_blocks}")
    nll, scored = 0.0, 0
    start = 0
    while start < len(ids) - 1:
        win = ids[start:start + window]
        targets = torch.tensor(win[1:], dtype=torch.int64, device=device)
        for c0 in range(0, len(win) - 1, chunk):  # inputs win[c0 : c0 + n] predict win[c0 + 1 : c0 + n + 1]
            inputs = win[c0:min(c0 + chunk, len(win) - 1)]
            batch = ForwardBatch.build([inputs], [c0], [pages], [0], block_size, device)
            with torch.inference_mode():
                hidden = model(batch, cache)                                    # [n, hidden]
                logits = model.compute_logits(hidden).float()                   # [n, vocab]
                tgt = targets[c0:c0 + len(inputs)]
                nll += torch.nn.functional.cross_entropy(logits, tgt, reduction="sum").item()
            scored += len(inputs)
        start += len(win) - 1
    return nll, scored


def perplexity(engine, documents: list[str], *, window: int | None = None, chunk: int | None = None,
               max_tokens: int | None = None) -> PplResult:
    """Perplexity of `engine`'s model over `documents` (see module doc). The engine must be idle.

    window: tokens per window (default: the engine's max_model_len, i.e. the model's context);
    chunk: tokens per forward (default: the engine's max_num_batched_tokens);
    max_tokens: stop once this many tokens are scored (the last document is cut)."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("perplexity needs a checkpoint with a tokenizer")
    if engine.has_unfinished_requests():
        raise ValueError("perplexity needs an idle engine")
    window = min(window or engine.max_model_len, engine.max_model_len)
    chunk = chunk or engine.engine_config.max_num_batched_tokens
    if window < 2 or chunk < 1:
        raise ValueError(f"window must be >= 2 and chunk >= 1, got window {window}, chunk {chunk}")
    sep = tok.token_to_id(DOC_SEP)
    if sep is None:
        raise ValueError(f"the tokenizer has no {DOC_SEP} token")
    total = PplResult(0.0, 0, 0, 0.0)
    for doc in documents:
        ids = [sep] + tok.encode(doc)
        if max_tokens is not None:
            ids = ids[:max_tokens - total.tokens + 1]
        if len(ids) < 2:
            continue
        t0 = time.perf_counter()
        nll, n = score_tokens(engine.model, engine.cache, ids, window, chunk, engine.cache.block_size)
        total.seconds += time.perf_counter() - t0
        total.nll += nll
        total.tokens += n
        total.documents += 1
        if max_tokens is not None and total.tokens >= max_tokens:
            break
    return total
