"""`qnext bench serve` (load generator for any OpenAI-compatible server) and `qnext bench latency` (in-process)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    s = sub.add_parser("serve", help="load-test an OpenAI-compatible server (metrics as `vllm bench serve`)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    s.add_argument("--model", default=None, help="model name sent to the server (default: the first of /v1/models)")
    s.add_argument("--tokenizer", default=None,
                   help="checkpoint directory whose tokenizer sizes the prompts (default: qnext's default model)")
    s.add_argument("--dataset-name", default="random", choices=["random"])
    s.add_argument("--random-input-len", type=int, default=1024)
    s.add_argument("--random-output-len", type=int, default=128)
    s.add_argument("--random-range-ratio", type=float, default=0.0)
    s.add_argument("--random-prefix-len", type=int, default=0)
    s.add_argument("--num-prompts", type=int, default=100)
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--request-rate", type=float, default=float("inf"))
    s.add_argument("--burstiness", type=float, default=1.0)
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--num-warmups", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--api-key", default=None)
    s.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds")
    s.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    s.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms: ttft:500 tpot:50 e2el:10000")
    s.add_argument("--result-file", default=None, help="JSON with every metric, the settings and each request")

    lat = sub.add_parser("latency", help="in-process prefill and decode speed, like llama-bench")
    from qnext.bench.latency import add_latency_args  # noqa: PLC0415 (only this subcommand needs the engine)
    add_latency_args(lat)


def _run_serve(args: argparse.Namespace) -> int:
    from qnext.bench.random_dataset import random_prompts
    from qnext.bench.serve import first_model, result_json, run_load
    from qnext.bench.serve_metrics import Slo, aggregate, format_table
    from qnext.tokenizer import Tokenizer

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.burstiness <= 0 or args.request_rate <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    percentiles = [float(x) for x in args.metric_percentiles.split(",") if x]
    slo = Slo.parse(args.goodput)
    if args.tokenizer is None:
        from qnext.default_model import default_model_path
        args.tokenizer = str(default_model_path())
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    prompts = random_prompts(tokenizer, args.num_prompts + args.num_warmups, args.random_input_len,
                             args.random_output_len, args.random_range_ratio, args.random_prefix_len, args.seed)
    warm, prompts = prompts[: args.num_warmups], prompts[args.num_warmups:]
    model = args.model or asyncio.run(first_model(args.base_url, args.api_key))
    results, duration = asyncio.run(run_load(
        args.base_url, args.endpoint, model, prompts, max_concurrency=args.max_concurrency,
        request_rate=args.request_rate, burstiness=args.burstiness, ignore_eos=args.ignore_eos,
        temperature=args.temperature, seed=args.seed, warmups=warm, api_key=args.api_key,
        timeout_s=args.timeout))
    metrics = aggregate(results, duration, percentiles, slo)
    print(format_table(metrics, percentiles))
    errors = sorted({r.error for r in results if not r.success})
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    if args.result_file:
        settings = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
        settings["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        with open(args.result_file, "w") as f:
            f.write(result_json(settings, metrics, results))
    return 0 if metrics["completed"] > 0 else 1


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return _run_serve(args)
    from qnext.bench.latency import run_latency
    return run_latency(args)
