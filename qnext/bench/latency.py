"""`qnext bench latency`: in-process prefill and decode speed, like llama-bench.

- prefill: one request of P random prompt tokens, 1 generated token; prompt tokens/s = P / time to first token.
- decode: B requests at context depth D (prompt of D tokens), N generated tokens each, greedy, ignore_eos; decode
  tokens/s = B * (N - 1) / (time from the last first token to the last finished request).
Each figure is the median of --repeats runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_latency_args(p: argparse.ArgumentParser) -> None:
    from qnext.commands.engine_args import add_engine_args

    p.add_argument("--model", default=None, help="checkpoint directory, or a preset name with --synthetic")
    p.add_argument("--synthetic", action="store_true",
                   help="random weights made directly on the device (no disk); --model may name a preset")
    p.add_argument("-p", "--prompt-lens", type=_ints, default=[512, 8192])
    p.add_argument("-b", "--batch-sizes", type=_ints, default=[1])
    p.add_argument("-d", "--depths", type=_ints, default=[1024])
    p.add_argument("-n", "--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--result-file", default=None)
    add_engine_args(p)


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(max(1, n))]


def _prefill_once(engine, ids: list[int]) -> float:
    from qnext.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("bench-prefill", ids, params)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def _decode_once(engine, prompts: list[list[int]], gen: int) -> float:
    from qnext.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"bench-decode-{i}", ids, params)
    started: set[str] = set()
    t_all_started = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs and out.outputs[0].delta_token_ids:
                started.add(out.request_id)
        if t_all_started is None and len(started) == len(prompts):
            t_all_started = time.perf_counter()
    return time.perf_counter() - (t_all_started or time.perf_counter())


def run_latency(args: argparse.Namespace) -> int:
    from qnext.commands.engine_args import build_engine

    engine = build_engine(args, synthetic=args.synthetic)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    rows = []
    for p in args.prompt_lens:
        times = [_prefill_once(engine, _random_ids(rng, p, vocab)) for _ in range(args.repeats + 1)][1:]
        t = statistics.median(times)
        rows.append({"test": f"pp{p}", "tokens_per_s": p / t, "seconds": t})
    for d in args.depths:
        for b in args.batch_sizes:
            def once() -> float:
                return _decode_once(engine, [_random_ids(rng, d, vocab) for _ in range(b)], args.gen_tokens)
            times = [once() for _ in range(args.repeats + 1)][1:]
            t = statistics.median(times)
            rows.append({"test": f"tg{args.gen_tokens} b{b} @ d{d}",
                         "tokens_per_s": b * (args.gen_tokens - 1) / t, "seconds": t})
    print(f"{'test':<28}{'tokens/s':>14}{'seconds':>12}")
    for r in rows:
        print(f"{r['test']:<28}{r['tokens_per_s']:>14.1f}{r['seconds']:>12.3f}")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
                       "results": rows}, f, indent=1)
    return 0
