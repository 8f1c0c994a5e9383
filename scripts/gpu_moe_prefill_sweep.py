#!/usr/bin/env python3
"""Tile sweep of the fused MoE's sorted (prefill) path at full model size, int4 g128 and / or fp8 block experts:
parity then timing per tile.

    python3 scripts/gpu_moe_prefill_sweep.py --out $OUT [--budget 300] [--kinds int4_128,fp8]
        [--configs '[{}, {"dq_pairs": false}]'] [--sizes 16384,8192,2048] [--iters 5]

Per kind, its defaults first, then the variants in SORTED (swapped or unswapped MMA operands, tiles), or the JSON
list --configs. Each config: parity against the torch reference at 1,024 tokens (the same kernels, fewer rows),
then CUDA-event time of fused_moe at each of --sizes tokens (two layers alternated so L2 never holds the next
call's experts).
Writes moe_sweep.json under --out and prints a table, fastest first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpu_check import H, I, TOPK, make_layer, rel, routings, time_events  # noqa: E402

from qnext.ops import quant  # noqa: E402
from qnext.ops.triton_moe import fused_moe  # noqa: E402

# sorted-path tiles at 8K per weight kind, the defaults first: int4's (swapped operands, the two-byte dequant)
# against the four-byte dequant, and tile variants; fp8's (unswapped) against swapped operands
SORTED = {"int4_128": [None, dict(dq_pairs=False), dict(bm=128), dict(bm=128, warps=8, warps2=8),
                       dict(bm=128, bn=128, warps=8, warps2=8), dict(bn=128, warps=8), dict(bn2=256, warps2=8),
                       dict(stages=4), dict(stages=2, stages2=3), dict(bm=128, warps=8, warps2=8, stages=4)],
          "fp8": [None, dict(swap=True, swap2=True), dict(swap=True), dict(swap2=True),
                  dict(swap=True, swap2=True, stages=4), dict(swap=True, swap2=True, bn=128, warps=8)]}
SIZES = "16384,8192,2048"       # tokens timed per config (a 16K-token step holds two 8K prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--kinds", default="int4_128", help="comma-separated: int4_128, fp8")
    ap.add_argument("--configs", help="JSON list of tile configs instead of SORTED's ({} = the defaults)")
    ap.add_argument("--sizes", default=SIZES, help="comma-separated token counts to time (the table sorts by the first)")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    wt, ids = routings(max(sizes), 1, seed=7)[0]
    x = torch.randn(max(sizes), H, device="cuda").bfloat16()
    rows = []
    for kind in args.kinds.split(","):
        layers = [make_layer(kind, s) for s in (1, 2)]
        ref = quant.moe_forward_ref(x[:1024], *layers[0], wt[:1024], ids[:1024], h_dtype=torch.bfloat16)
        for cfg in json.loads(args.configs) if args.configs else SORTED[kind]:
            if time.time() - t0 > args.budget:
                break
            row = {"kind": kind, "config": cfg or {}}
            try:
                row["parity_rel"] = rel(fused_moe(x[:1024], *layers[0], wt[:1024], ids[:1024], path="sorted",
                                                  config=cfg), ref)
                for m in sizes:
                    row[f"us_{m}"] = time_events(lambda i, m=m: fused_moe(x[:m], *layers[i % 2], wt[:m], ids[:m],
                                                                          path="sorted", config=cfg),
                                                 n_inputs=2, iters=args.iters)
                    row[f"tflops_{m}"] = 2 * m * TOPK * 3 * H * I / row[f"us_{m}"] / 1e6
            except Exception as e:  # noqa: BLE001 - a tile that fails to compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        del layers
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "moe_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| kind | config | parity rel | " + " | ".join(f"us @{m} | TFLOP/s" for m in sizes) + " |\n|"
          + "---|" * (3 + 2 * len(sizes)))
    for r in sorted(rows, key=lambda r: (r["kind"], r.get(f"us_{sizes[0]}", 1e30))):
        if "error" in r:
            print(f"| {r['kind']} | {r['config']} | error: {r['error'][:80]} |")
        else:
            print(f"| {r['kind']} | {r['config']} | {r['parity_rel']:.1e} | "
                  + " | ".join(f"{r[f'us_{m}']:.0f} | {r[f'tflops_{m}']:.0f}" for m in sizes) + " |")


if __name__ == "__main__":
    main()
