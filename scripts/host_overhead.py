#!/usr/bin/env python3
"""Host (Python) cost of one engine decode step, the model stubbed out: what the CPU spends per step on
scheduling, batch building, sampling bookkeeping, stop checks, detokenization and outputs, which a GPU step pays
on top of its kernels (the "host share" in docs/benchmarks.md). Runs on any machine, on the CPU.

    python3 scripts/host_overhead.py [--batch 1,8,32] [--steps 300] [--profile]

The engine is the real one on the bundled demo checkpoint (tokenizer and detokenization included); the model's
forward returns zeros and its logits are random rows of a fixed [V, V] table, so greedy ids vary like text.
Requests: 64-token random prompts, greedy, ignore_eos, no stop strings (the bench-serve case).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qnext.config import EngineConfig  # noqa: E402
from qnext.default_model import default_model_path  # noqa: E402
from qnext.engine.llm_engine import LLMEngine  # noqa: E402
from qnext.sampling_params import SamplingParams  # noqa: E402


def stub_engine(batch: int, max_tokens: int) -> LLMEngine:
    pages = -(-(64 + max_tokens) // 16)
    eng = LLMEngine.from_pretrained(default_model_path(), EngineConfig(
        device="cpu", max_num_seqs=batch, num_kv_blocks=pages * batch + 16, max_model_len=pages * 16))
    hidden, vocab = eng.model_config.hidden_size, eng.model_config.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    rows = torch.Generator().manual_seed(1)
    eng.runner.forward = lambda fb: torch.zeros(fb.num_tokens, hidden)
    eng.model.compute_logits = lambda h, dtype=None: table[torch.randint(0, vocab, (h.shape[0],), generator=rows)]
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [rng.randrange(100, vocab - 100) for _ in range(64)], params)
    while eng.scheduler.waiting:
        eng.step()
    for _ in range(20):
        eng.step()
    return eng


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile the last batch size's steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'batch':>6}{'us/step':>10}{'us/request':>12}")
    for b in [int(x) for x in args.batch.split(",")]:
        eng = stub_engine(b, max_tokens=20 + args.steps * (args.repeats + 1) + 1)
        times = []
        for _ in range(args.repeats):
            t0 = time.thread_time()
            for _ in range(args.steps):
                eng.step()
            times.append((time.thread_time() - t0) / args.steps)
        t = min(times)                                   # the least disturbed run (shared CPUs are noisy)
        print(f"{b:>6}{t * 1e6:>10.0f}{t / b * 1e6:>12.1f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            eng.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumtime").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
