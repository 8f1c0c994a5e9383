"""A model of serve-8k1k-c32 (shared/bench-protocol.md) from step costs, for predictions written before a GPU run.

    python3 scripts/serve_model.py [--t-dec 0.0164] [--c0 0.066] [--c1 21e-6] [--budgets 16384,32768]

Closed loop: `clients` requests of `prompt` tokens and `out` output tokens each; a finished request is replaced at
once (bench serve's semaphore). Each step takes every decoding request plus prompt chunks in arrival order up to
the token budget (decodes count against it, as in qnext.engine.scheduler). A step costs t_dec when it holds only
decodes (a CUDA-graph replay at ~9K context), else c0 + c1 * (prompt tokens) + t_mix (the decodes riding along).
A request's first token comes with its last prompt chunk. Output: output tokens/s and mean TTFT over `total`
requests, the first wave included, as bench serve counts them. Not a measurement: the step costs come from runs
in docs/benchmarks.md, and the model ignores host time, HTTP and the longer context of later decode steps.
Calibration (H100, 2026-12-05): t_dec 16.4 ms (serve's median ITL), c0 + c1 x 8192 = 0.238 s (prefill-8k) and
c0 + c1 x 16384 ~ 0.41 s (serve's two-prompt steps) give 1,400 tok/s at budget 16,384 against 1,332 measured.
"""

from __future__ import annotations

import argparse


def simulate(budget: int, *, t_dec: float, c0: float, c1: float, t_mix: float = 0.003, prompt: int = 8192,
             out: int = 1024, clients: int = 32, total: int = 512) -> tuple[float, float]:
    """-> (output tokens/s, mean TTFT s)."""
    t, done, sent = 0.0, 0, clients
    running: list[list[float]] = []                     # [prompt tokens done, output tokens, arrival time]
    waiting = [[0, 0, 0.0] for _ in range(clients)]
    ttfts = []
    while done < total:
        decoding = [r for r in running if r[0] >= prompt]
        room, chunks = budget - len(decoding), []
        for r in running + waiting:                     # partly prefilled requests first, then arrivals
            if r[0] < prompt and room > 0:
                n = min(prompt - r[0], room)
                chunks.append((r, n))
                room -= n
                if r in waiting:
                    waiting.remove(r)
                    running.append(r)
        filled = sum(n for _, n in chunks)
        t += c0 + c1 * filled + t_mix if filled else t_dec
        for r in decoding:
            r[1] += 1
        for r, n in chunks:
            r[0] += n
            if r[0] >= prompt:
                r[1] += 1
                ttfts.append(t - r[2])
        for r in [r for r in running if r[1] >= out]:
            running.remove(r)
            done += 1
            if sent < total:
                waiting.append([0, 0, t])
                sent += 1
    return done * out / t, sum(ttfts) / len(ttfts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t-dec", type=float, default=0.0164, help="decode-only step, s")
    ap.add_argument("--c0", type=float, default=0.066, help="fixed cost of a step with prompt tokens, s")
    ap.add_argument("--c1", type=float, default=21e-6, help="cost per prompt token, s")
    ap.add_argument("--budgets", default="8192,16384,16416,32768")
    ap.add_argument("--total", type=int, default=512)
    args = ap.parse_args()
    for b in map(int, args.budgets.split(",")):
        tps, ttft = simulate(b, t_dec=args.t_dec, c0=args.c0, c1=args.c1, total=args.total)
        print(f"budget {b:>6}: {tps:,.0f} output tok/s, mean TTFT {ttft:.2f} s")


if __name__ == "__main__":
    main()
