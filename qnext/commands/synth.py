"""`qnext synth`: write a random-weight checkpoint of a preset shape (real Qwen3-Next file layout)."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    from qnext.weights.presets import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--fp8", action="store_true", help="store projections as block FP8 e4m3 (128x128 scales)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="4GB", help="largest safetensors shard, e.g. 4GB, 500MB")
    p.add_argument("--mtp", action="store_true", help="also write a random MTP head (mtp.* tensors)")
    p.add_argument("--config-only", action="store_true",
                   help="write config.json and the tokenizer files only, no weights: a directory for --synthetic "
                        "runs (qnext serve / generate / bench), which make the weights on the device")


def run(args: argparse.Namespace) -> int:
    from qnext.weights.checkpoint_writer import write_checkpoint

    try:
        out = write_checkpoint(args.out, args.preset, dtype=args.dtype, fp8=args.fp8, seed=args.seed,
                               shard_size=args.shard_size, mtp=args.mtp, tensors=not args.config_only,
                               progress=True)
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    print(f"wrote {args.preset} {'config and tokenizer' if args.config_only else 'checkpoint'} to {out}")
    return 0
