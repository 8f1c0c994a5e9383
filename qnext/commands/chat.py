"""`qnext chat [--model DIR]`: interactive chat that keeps history. /exit or end of input quits, /reset clears."""

from __future__ import annotations

import argparse
import sys

from qnext.commands.generate import add_model_args, add_sampling_args, sampling_params, stream
from qnext.commands.engine_args import build_engine


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message")
    add_model_args(p)
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    engine = build_engine(args, synthetic=args.synthetic)
    if engine.tokenizer is None or engine.chat_template is None:
        raise ValueError("chat needs a checkpoint with a tokenizer and a chat template")
    params = sampling_params(engine, args, default_max_tokens=1024)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("qnext chat: /exit or Ctrl-D quits, /reset clears the history", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.tokenizer.encode(engine.chat_template.render(history, add_generation_prompt=True))
        if len(ids) >= engine.max_model_len:
            history.pop()
            print(f"[the conversation ({len(ids)} tokens) no longer fits max_model_len {engine.max_model_len}; "
                  f"/reset to start over]", file=sys.stderr)
            continue
        try:
            final = stream(engine, ids, params)
        except KeyboardInterrupt:  # stop this reply, keep chatting
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": final.outputs[0].text})
    return 0
