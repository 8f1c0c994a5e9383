"""`qnext <command>`: each command lives in qnext/commands/<name>.py with add_parser(sub) and run(args)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": "OpenAI- and Anthropic-compatible HTTP server",
    "generate": "complete one prompt, streamed to the terminal",
    "chat": "interactive chat that keeps history",
    "synth": "write a random-weight checkpoint of a preset shape",
    "bench": "benchmarks: latency (in-process) and serve (load generator)",
    "eval": "perplexity and completion quality",
}


def _command_module(name: str):
    return importlib.import_module(f"qnext.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qnext", description="Fast inference for Qwen3-Coder-Next")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = _command_module(name)
        except ModuleNotFoundError as e:
            if e.name != f"qnext.commands.{name}":
                raise
            continue  # command not built yet
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_command_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:  # config, weight and argument errors carry clear messages
        print(f"qnext {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
