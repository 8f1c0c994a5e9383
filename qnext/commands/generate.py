"""`qnext generate [--model DIR] "prompt"`: complete one prompt, streamed to the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from qnext.commands.engine_args import add_engine_args, build_engine


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; those not given fall back to the checkpoint's generation_config.json.
    The engine's --seed seeds sampling, so a run is reproducible."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None, help="default: 256 for generate, 1024 for chat")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: qnext's default model)")
    p.add_argument("--synthetic", action="store_true",
                   help="random weights made on the device; --model may then name a preset (tiny, small, ...)")
    add_engine_args(p)
    p.set_defaults(max_num_seqs=1)  # one conversation: no GDN slots or KV pages for 64 sequences


def sampling_params(engine, args: argparse.Namespace, default_max_tokens: int):
    return engine.default_sampling_params(
        max_tokens=args.max_tokens or default_max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=args.stop, ignore_eos=args.ignore_eos or None)


def stream(engine, prompt_ids: list[int], params, out=None, show_ids: bool = False):
    """Run one request to the end, writing its text (or token ids) to `out` (default: the sys.stdout of the call,
    not of the import) as it comes; returns the final output."""
    out = out or sys.stdout
    rid = f"cli-{time.monotonic_ns()}"
    max_tokens = params.max_tokens
    if max_tokens is not None and len(prompt_ids) + max_tokens > engine.max_model_len:  # fit, don't fail
        params = dataclasses.replace(params, max_tokens=max(1, engine.max_model_len - len(prompt_ids)))
    engine.add_request(rid, prompt_ids, params)
    final = None
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                c = o.outputs[0]
                piece = " ".join(map(str, c.delta_token_ids)) + " " if show_ids else c.delta_text
                if piece:
                    out.write(piece)
                    out.flush()
                if o.finished:
                    final = o
    except BaseException:
        engine.abort_request(rid)
        raise
    return final


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (use --prompt-token-ids without a tokenizer)")
    p.add_argument("--prompt-token-ids", default=None, help="comma-separated token ids instead of text")
    add_model_args(p)
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_token_ids is None):
        raise ValueError("give a prompt, or --prompt-token-ids")
    engine = build_engine(args, synthetic=args.synthetic)
    if args.prompt_token_ids is not None:
        ids = [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
    elif engine.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; pass --prompt-token-ids")
    else:
        ids = engine.tokenizer.encode(args.prompt)
    params = sampling_params(engine, args, default_max_tokens=256)
    start = time.perf_counter()
    show_ids = engine.tokenizer is None
    if not show_ids:
        sys.stdout.write(args.prompt if args.prompt is not None else engine.tokenizer.decode(ids))
    final = stream(engine, ids, params, show_ids=show_ids)
    sys.stdout.write("\n")
    n = len(final.outputs[0].token_ids)
    dt = time.perf_counter() - start
    print(f"[{len(ids)} prompt + {n} generated tokens in {dt:.2f}s, {n / dt:.1f} tok/s, "
          f"finish: {final.outputs[0].finish_reason}]", file=sys.stderr)
    return 0
