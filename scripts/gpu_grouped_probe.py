#!/usr/bin/env python3
"""Where the grouped int4 MoE's time goes (serve's b32 decode step): the production kernels against variants of
one probe kernel that differ in the weights' memory layout and in whether the math runs at all.

    python3 scripts/gpu_grouped_probe.py --out $OUT [--budget 240]

Variants (one layer of 512 experts, int4 g128, uniform routing; us per call from CUDA-graph replays over 2 layers
x 8 routings, % of the copy rate for the distinct experts' bytes; parity of the full-math variants against the
float32 reference):
- default: qnext's moe_grouped (over tiled storage since the probe's first run).
- probe rows: the probe kernel over the stored layout (rows of K/2 bytes): must match default.
- probe tiles: each (expert, BN rows, 128-element K step) tile of the weights (and its BN scales) stored
  contiguously, so one pipeline stage reads 4-8 KB in one piece instead of BN pieces of 64 bytes 1 KB apart.
- probe tiles gu: gate_up's gate and up tiles of a step side by side, so a program reads one sequential stream.
- ... load-only: the same loads, no dequantization and no dots (an xor keeps them alive): the access pattern's rate.
Then the two GEMM kernels of one call apart (torch profiler, in launch order) for default and the best variant.

    python3 scripts/gpu_grouped_probe.py --out $OUT --tile-rows 0,4,8,16,64

instead times qnext's own kernels over tiles of each height (0: rows): the grouped path at 8 / 32 / 64 tokens and
the batch-1 GEMV (default tiles, and 2 or 4 weight rows per gate_up program), parity of each against the reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

import gpu_check as gc  # noqa: E402
from qnext.ops import quant  # noqa: E402
from qnext.ops.triton_moe_grouped import BM, group_pairs, slot_rows  # noqa: E402
from qnext.ops.triton_moe_weights import int4_dq  # noqa: E402


@triton.jit
def _tile_ptrs(wb, sb, r0, k0, N, K, stride_wn, stride_sn, HALF: tl.constexpr, LAYOUT: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """Pointers to one K step's [BK/2, BN] weight bytes and [BN] scales of rows HALF * N + r0 + [0, BN).
    LAYOUT 0: rows [N, K/2]; 1: tiles [N/BN, K/BK, BN, BK/2]; 2: gate / up tiles side by side
    [N/BN, K/BK, 2, BN, BK/2] (gate_up only)."""
    j = tl.arange(0, BN)
    b = tl.arange(0, BK // 2)
    if LAYOUT == 0:
        rows = HALF * N + r0 + j
        return wb + rows[None, :] * stride_wn + (k0 // 2 + b)[:, None], sb + rows * stride_sn + k0 // BK
    if LAYOUT == 1:
        t = ((HALF * N + r0) // BN) * (K // BK) + k0 // BK
    else:
        t = ((r0 // BN) * (K // BK) + k0 // BK) * 2 + HALF
    return wb + t * (BN * BK // 2) + j[None, :] * (BK // 2) + b[:, None], sb + t * BN + j


@triton.jit
def _probe_kernel(a_ptr, w_ptr, s_ptr, out_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, used_ptr, tw_ptr,
                  N, K, TOPK, stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                  GATE_UP: tl.constexpr, LAYOUT: tl.constexpr, LOAD_ONLY: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    """qnext's _moe_grouped_kernel for int4 weights (no PDL), the layout and the math as above."""
    s = tl.program_id(0)
    r0 = tl.program_id(1) * BN
    if s >= tl.load(used_ptr):
        return
    e, mvalid, pair, a_rows = slot_rows(a_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, s, TOPK, stride_am,
                                        GATE_UP, BM)
    wb = w_ptr + e * stride_we
    sb = s_ptr + e * stride_se
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    accx = tl.zeros([BK // 2, BN], dtype=tl.int32)
    accs = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        pw, ps = _tile_ptrs(wb, sb, r0, k0, N, K, stride_wn, stride_sn, 0, LAYOUT, BN, BK)
        if LOAD_ONLY:
            accx ^= tl.load(pw).to(tl.int32)
            accs += tl.load(ps).to(tl.float32)
            if GATE_UP:
                pw, ps = _tile_ptrs(wb, sb, r0, k0, N, K, stride_wn, stride_sn, 1, LAYOUT, BN, BK)
                accx ^= tl.load(pw).to(tl.int32)
                accs += tl.load(ps).to(tl.float32)
        else:
            ka = k0 + tl.arange(0, BK // 2)
            m = mvalid[:, None]
            xa = tl.load(a_rows[:, None] + ka[None, :], mask=m, other=0.0)
            xb = tl.load(a_rows[:, None] + (ka + BK // 2)[None, :], mask=m, other=0.0)
            lo, hi = int4_dq(tl.load(pw), xa.dtype)
            acc += (tl.dot(xa, lo) + tl.dot(xb, hi)) * tl.load(ps).to(tl.float32)[None, :]
            if GATE_UP:
                pw, ps = _tile_ptrs(wb, sb, r0, k0, N, K, stride_wn, stride_sn, 1, LAYOUT, BN, BK)
                lo, hi = int4_dq(tl.load(pw), xa.dtype)
                acc2 += (tl.dot(xa, lo) + tl.dot(xb, hi)) * tl.load(ps).to(tl.float32)[None, :]
    if LOAD_ONLY:
        acc += (tl.sum(accx, 0).to(tl.float32) + accs)[None, :]
    optrs = out_ptr + pair[:, None] * stride_om + (r0 + tl.arange(0, BN))[None, :]
    if GATE_UP:
        tl.store(optrs, (acc * tl.sigmoid(acc) * acc2).to(out_ptr.dtype.element_ty), mask=mvalid[:, None])
    else:
        tw = tl.load(tw_ptr + pair, mask=mvalid, other=0.0).to(tl.float32)
        tl.store(optrs, (acc * tw[:, None]).to(out_ptr.dtype.element_ty), mask=mvalid[:, None])


def relayout(q: quant.Int4GroupWeight, bn: int, layout: int, gate_up: bool):
    """(data, scale) of an int4 g128 stacked weight [E, N, K/2] in `layout` (see _tile_ptrs), flat per expert."""
    q = quant.untile_int4(q)
    data, scale = q.qweight, q.scale                  # [E, N, K/2] uint8, [E, N, K/128] bf16
    e, n, kh = data.shape
    ks = kh // 64
    if layout == 0:
        return data.contiguous(), scale.contiguous()
    if layout == 1 or not gate_up:
        d = data.view(e, n // bn, bn, ks, 64).permute(0, 1, 3, 2, 4)
        s = scale.view(e, n // bn, bn, ks).permute(0, 1, 3, 2)
    else:
        d = data.view(e, 2, n // 2 // bn, bn, ks, 64).permute(0, 2, 4, 1, 3, 5)
        s = scale.view(e, 2, n // 2 // bn, bn, ks).permute(0, 2, 4, 1, 3)
    return d.contiguous().view(e, n, kh), s.contiguous().view(e, n, ks)


class Probe:
    """One variant: the two layers' weights relaid once, a call like moe_grouped's."""

    def __init__(self, layers, layout: int, load_only: bool, bn: int = 64, bn2: int = 128, stages: int = 4):
        self.layout, self.load_only, self.bn, self.bn2, self.stages = layout, load_only, bn, bn2, stages
        self.layers = [(relayout(w13, bn, layout, True), relayout(w2, bn2, layout, False)) for w13, w2 in layers]

    def _gemm(self, a, w, out, groups, tw, n, k, top_k, gate_up, bn):
        data, scale = w
        slot_e, slot_cnt, slot_pairs, used = groups
        _probe_kernel[(slot_e.shape[0], n // bn)](
            a, data, scale, out, slot_e, slot_cnt, slot_pairs, used, tw, n, k, top_k,
            a.stride(0), data.stride(0), data.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
            GATE_UP=gate_up, LAYOUT=self.layout if gate_up else min(self.layout, 1), LOAD_ONLY=self.load_only,
            BM=BM, BN=bn, BK=128, num_warps=4, num_stages=self.stages)

    def __call__(self, x, li, topk_weights, topk_ids):
        w13, w2 = self.layers[li]
        m, top_k = topk_ids.shape
        p, inter, hidden = m * top_k, w2[0].shape[2] * 2, w2[0].shape[1]
        groups = group_pairs(topk_ids, w13[0].shape[0])
        tw = topk_weights.reshape(-1).contiguous()
        h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
        self._gemm(x, w13, h, groups, tw, inter, hidden, top_k, True, self.bn)
        y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
        self._gemm(h, w2, y, groups, tw, hidden, inter, top_k, False, self.bn2)
        return y.view(m, top_k, hidden).sum(dim=1)


def kernels_apart(name, fn, args_at) -> None:
    """The GEMM kernels of 16 calls in launch order: gate_up (first) and down (second) mean us."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(16):
            fn(*args_at(i))
        torch.cuda.synchronize()
    gemms = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                    and ("_moe_grouped_kernel" in e.name or "_probe_kernel" in e.name)),
                   key=lambda e: e.time_range.start)
    gu = [e.time_range.elapsed_us() for e in gemms[0::2]]
    dn = [e.time_range.elapsed_us() for e in gemms[1::2]]
    if gu and dn:
        gc.RESULTS["timing"][f"{name} kernels"] = {"gate_up": statistics.median(gu), "down": statistics.median(dn)}
        print(f"[kernels] {name}: gate_up {statistics.median(gu):.1f} us, down {statistics.median(dn):.1f} us "
              f"({len(gu)}/{len(dn)} events)", flush=True)


def tile_sweep(heights: list[int]) -> None:
    from qnext.ops.triton_moe import fused_moe
    rows = [tuple(quant.untile_int4(w) for w in gc.make_layer("int4_128", seed)) for seed in (1, 2)]
    per_expert = gc.expert_bytes(*rows[0])
    cases = [(1, "gemv", None), (1, "gemv", dict(mbm1=2)), (1, "gemv", dict(mbm1=4, mw1=2)), (32, "grouped", None),
             (8, "grouped", None), (64, "grouped", None)]
    for t in heights:
        layers = rows if t == 0 else [tuple(quant.tile_int4(w, t) for w in layer) for layer in rows]
        for m, path, cfg in cases:
            if gc.left() < 15:
                return
            routes = gc.routings(m, 8, seed=m)
            xs = [torch.randn(m, gc.H, device="cuda").bfloat16() for _ in range(4)]
            uniq = statistics.mean(int(torch.unique(r[1]).numel()) for r in routes)
            tag = f"tiles {t} M={m} {path} {cfg or ''}"
            fn = lambda x, li, wt, ids, cfg=cfg, path=path: fused_moe(x, *layers[li], wt, ids, path=path, config=cfg)
            try:
                w, ids = routes[0]
                ref = quant.moe_forward_ref(xs[0], *rows[0], w, ids, h_dtype=torch.bfloat16)
                gc.parity(tag, gc.rel(fn(xs[0], 0, w, ids), ref), 1.5e-2)
                us = gc.time_graph(lambda i: fn(xs[i % 4], i % 2, *routes[i % 8]), 16)
            except Exception as e:
                gc.RESULTS["errors"][tag] = repr(e)[:400]
                print(f"[error] {tag}: {e!r}"[:600], flush=True)
                continue
            gc.record(tag, us, bytes_=uniq * per_expert, note=f"{uniq:.0f} experts")
        del layers
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--tile-rows", default="", help="comma-separated tile heights: time qnext's kernels over each")
    args = ap.parse_args()
    gc.BUDGET = args.budget
    os.makedirs(args.out, exist_ok=True)
    gc.env()
    if args.tile_rows:
        try:
            tile_sweep([int(t) for t in args.tile_rows.split(",")])
        finally:
            gc.write_results(args.out, "gpu_tile_sweep")
        return
    from qnext.ops.triton_moe import fused_moe
    qlayers = [gc.make_layer("int4_128", s) for s in (1, 2)]
    per_expert = gc.expert_bytes(*qlayers[0])
    variants = {"default": lambda x, li, wt, ids: fused_moe(x, *qlayers[li], wt, ids, path="grouped")}
    for name, kw in (("probe rows", dict(layout=0, load_only=False)),
                     ("probe tiles", dict(layout=1, load_only=False)),
                     ("probe tiles gu", dict(layout=2, load_only=False)),
                     ("probe rows load-only", dict(layout=0, load_only=True)),
                     ("probe tiles load-only", dict(layout=1, load_only=True)),
                     ("probe tiles gu load-only", dict(layout=2, load_only=True)),
                     ("probe tiles gu bn128", dict(layout=2, load_only=False, bn=128)),
                     ("probe tiles gu 3 stages", dict(layout=2, load_only=False, stages=3))):
        variants[name] = Probe(qlayers, **kw)
    best = {}
    try:
        run(variants, qlayers, per_expert, best)
    finally:
        gc.write_results(args.out, "gpu_grouped_probe")


def run(variants, qlayers, per_expert, best) -> None:
    for m in (32, 8, 64):
        routes = gc.routings(m, 8, seed=m)
        xs = [torch.randn(m, gc.H, device="cuda").bfloat16() for _ in range(4)]
        uniq = statistics.mean(int(torch.unique(r[1]).numel()) for r in routes)
        w, ids = routes[0]
        ref = quant.moe_forward_ref(xs[0], *qlayers[0], w, ids, h_dtype=torch.bfloat16)
        for name, fn in variants.items():
            if gc.left() < 20:
                break
            tag = f"int4 M={m} {name}"
            try:
                if "load-only" not in name:
                    gc.parity(tag, gc.rel(fn(xs[0], 0, w, ids), ref), 1.5e-2)
                us = gc.time_graph(lambda i, fn=fn: fn(xs[i % 4], i % 2, *routes[i % 8]), 16)
            except Exception as e:
                gc.RESULTS["errors"][tag] = repr(e)[:400]
                print(f"[error] {tag}: {e!r}"[:600], flush=True)
                continue
            gc.record(tag, us, bytes_=uniq * per_expert, note=f"{uniq:.0f} experts")
            if "load-only" not in name and us < best.get(m, (1e9, ""))[0]:
                best[m] = (us, name)
        if m == 32:
            for name in dict.fromkeys(["default", "probe rows", best[32][1], "probe tiles gu load-only"]):
                if gc.left() > 15:
                    kernels_apart(f"int4 M=32 {name}", variants[name],
                                  lambda i: (xs[i % 4], i % 2, *routes[i % 8]))
    print(f"[best] {best}", flush=True)


if __name__ == "__main__":
    main()
