"""`qnext eval ppl | complete`: perplexity over files, and greedy completion of held-out function headers.

Without --data both use the held-out files of the running interpreter's standard library (qnext/eval/heldout.py),
which the demo model never saw in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    from qnext.commands.engine_args import add_engine_args

    p.add_argument("--model", default=None, help="checkpoint directory (default: qnext's default model)")
    p.add_argument("--result-file", default=None, help="write the figures (and per-example rows) as JSON here")
    add_engine_args(p)


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    ppl = sub.add_parser("ppl", help="perplexity and tokens/s over files (teacher-forced, token-weighted)")
    ppl.add_argument("--data", nargs="+", default=None,
                     help="files or folders (*.py inside); a file with <|endoftext|> lines holds several documents "
                          "(default: the held-out stdlib files)")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="stop after scoring this many tokens")
    _common(ppl)
    ppl.set_defaults(max_num_seqs=1)

    c = sub.add_parser("complete", help="greedy completion of held-out function headers; share that parses")
    c.add_argument("--data", default=None,
                   help="heldout_headers.jsonl from scripts/build_corpus.py (default: made from the held-out "
                        "stdlib files of this interpreter)")
    c.add_argument("--num", type=int, default=100, help="headers to complete (the first N in fixed random order)")
    c.add_argument("--max-tokens", type=int, default=256, help="longest body, in tokens")
    c.add_argument("--context-chars", type=int, default=2000,
                   help="file source before the header given as context (0: the header alone)")
    c.add_argument("--show", type=int, default=0, help="print the first N completions")
    _common(c)


def _run_ppl(args: argparse.Namespace) -> int:
    from qnext.eval.heldout import heldout_stdlib_files, read_source
    from qnext.eval.ppl import load_documents, perplexity

    if args.data:
        docs, source = load_documents(args.data), " ".join(args.data)
    else:
        docs = [src[0] for _, path in heldout_stdlib_files() if (src := read_source(path)) is not None]
        source = "held-out stdlib files"
    if not docs:
        raise ValueError("no documents to score")
    from qnext.commands.engine_args import build_engine

    engine = build_engine(args)
    r = perplexity(engine, docs, window=args.window, max_tokens=args.max_tokens)
    window = min(args.window or engine.max_model_len, engine.max_model_len)
    print(f"model {engine.model_path}  dtype {engine.dtype}  device {engine.device}  quantization "
          f"{args.quantization or 'none'}")
    print(f"data: {source} ({r.documents} documents, {r.tokens} tokens scored, window {window})")
    print(f"perplexity {r.ppl:.4f}  (mean NLL {r.mean_nll:.4f} nats/token)  {r.tokens_per_s:.0f} tokens/s")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"model": str(engine.model_path), "dtype": str(engine.dtype), "device": str(engine.device),
                       "quantization": args.quantization, "data": source, "documents": r.documents,
                       "tokens": r.tokens, "window": window, "nll": r.nll, "ppl": r.ppl,
                       "tokens_per_s": r.tokens_per_s}, f, indent=1)
    return 0


def _run_complete(args: argparse.Namespace) -> int:
    from qnext.commands.engine_args import engine_config_from_args
    from qnext.eval.complete import complete, load_headers
    from qnext.llm import LLM

    records = load_headers(args.data, args.num)
    if not records:
        raise ValueError("no function headers to complete")
    llm = LLM(args.model, **dataclasses.asdict(engine_config_from_args(args)))
    r = complete(llm, records, max_tokens=args.max_tokens, context_chars=args.context_chars)
    for row in r.rows[: args.show]:
        rec = next(x for x in records if x["file"] == row["file"] and x["line"] == row["line"])
        print(f"----- {row['file']}:{row['line']}  ended={row['ended']} parsed={row['parsed']}")
        print(rec["header"] + row["completion"], end="")
    print(f"model {llm.engine.model_path}  dtype {llm.engine.dtype}  device {llm.engine.device}")
    print(f"{r.parsed}/{r.examples} completions parse ({100 * r.parse_rate:.1f}%); {r.ended} bodies ended within "
          f"{args.max_tokens} tokens; counting bodies cut at max tokens whose whole lines parse: {r.parsed_lenient} "
          f"({100 * r.lenient_rate:.1f}%)")
    print(f"{r.generated_tokens} tokens generated in {r.seconds:.1f}s ({r.tokens_per_s:.1f} tok/s over the batch), "
          f"greedy, context {args.context_chars} chars")
    if args.result_file:
        with open(args.result_file, "w") as f:
            settings = {"max_tokens": args.max_tokens, "context_chars": args.context_chars, "data": args.data,
                        "num": args.num}
            json.dump({"model": str(llm.engine.model_path), "examples": r.examples, "parsed": r.parsed,
                       "parsed_lenient": r.parsed_lenient, "ended": r.ended, "parse_rate": r.parse_rate,
                       "generated_tokens": r.generated_tokens, "seconds": r.seconds, "settings": settings,
                       "rows": r.rows}, f, indent=1)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "ppl":
        return _run_ppl(args)
    if args.eval_command == "complete":
        return _run_complete(args)
    print(f"unknown eval command {args.eval_command}", file=sys.stderr)
    return 2
