"""Fused MoE, GEMV path (decode, few (token, expert) pairs): no sorting and no torch bookkeeping, so it sits in a
CUDA graph as 2-3 launches. Modes and formats: qnext/ops/triton_moe.py's docstring."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops import triton_moe_gemv_mma
from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.triton_moe_gemv_mma import mma_gemv
from qnext.ops.triton_moe_weights import (BF16, FP8, INT4, KernelWeight, int4_dq, int4_group_offsets,
                                          int4_row_offsets, int4_scale_group_offsets, int4_scale_row_offsets)

Tensor = torch.Tensor

# GEMV tiles per weight kind: BN rows x RB stored units of K per step (elements for bf16/fp8, bytes for int4),
# split into NG groups of GS units (fp8: GS = 128, the scale block; int4: GS = group / 2 bytes, one scale; bf16:
# NG = 1). Kernel 1 (gate_up) loads two such tiles per step, kernel 2 (down) one. Overridable per call through
# `config` (keys bn1, rb1, w1, bn2, rb2, w2); tuned by scripts/gpu_check.py.
# int4 runs on tensor cores (triton_moe_gemv_mma.py; config mma=False: the CUDA-core kernels below); fp8 in the
# split mode only (mma="split"): in the batch-1 chain (H100, 256 FP8 experts, scripts/gpu_e2e.py --extras tiles)
# the step replayed in 2.343 ms against 2.395 on CUDA cores, whose kernels were faster at 8 rows. int4's gate_up
# takes 2 weight rows per program on 2 warps (b1 replay 2.17 ms against 2.31 with 1 row on 1 warp; 4 rows on 4
# warps 2.21, 8 on 8 2.33); fp8's (2 KB rows) stays at 1 row: 2.356 ms against 2.368 at 2 rows on 2 warps, and
# with dots in fp16 (activations scaled by a power of two; tried 2026-12-06, removed) 2.426 at 1 row. fp8's down
# keeps int4's slices of 32 units: 64 and 128 (fewer instructions per program) replayed 2.320 / 2.329 against 2.286.
MMA = dict(mma=True, mbm1=1, mw1=1, mks1=None, mbm2=8, mw2=1, mks2=32, mst=2)
GEMV_DEFAULTS = {
    BF16: dict(bn1=16, rb1=256, w1=4, bn2=16, rb2=512, w2=4),
    FP8: dict(bn1=16, rb1=512, w1=4, bn2=16, rb2=512, w2=4, **dict(MMA, mma="split")),
    INT4: dict(bn1=16, rb1=256, w1=4, bn2=16, rb2=256, w2=4, **dict(MMA, mbm1=2, mw1=2)),
}
# One step per program (the split mode) up to this many pairs (M <= 3 at top-10: latency bound; it lost at M = 8
# except bf16).
SPLIT_MAX_PAIRS = 32


@triton.jit
def _gemv_load(w_base, s_base, rows, rmask, gg, kp, km, stride_wn, stride_sn, KLIM,
               KIND: tl.constexpr, GS: tl.constexpr, TR: tl.constexpr = 0):
    """One weight tile of _gemv_tile as stored: (w [BN, NG, GS], int4 group scales [BN, NG] float32; other kinds
    return w twice, the second unused)."""
    mask = rmask[:, None, None] & km[None, :, :]
    if KIND == 2:
        kw = kp + (int4_group_offsets(gg, TR, GS) - gg * GS)[:, None]          # kp's bytes where they are stored
        p = tl.load(w_base + int4_row_offsets(rows, stride_wn, TR, GS)[:, None, None] + kw[None, :, :], mask=mask,
                    other=0)
        sc = tl.load(s_base + int4_scale_row_offsets(rows, stride_sn, TR)[:, None]
                     + int4_scale_group_offsets(gg, TR)[None, :],
                     mask=rmask[:, None] & (gg * GS < KLIM)[None, :], other=0).to(tl.float32)
    else:
        p = tl.load(w_base + rows[:, None, None] * stride_wn + kp[None, :, :], mask=mask, other=0.0)
        sc = p
    return p, sc


@triton.jit
def _gemv_dot(acc, w, sc, xa, xb, KIND: tl.constexpr):
    """acc [BN, NG] += a tile of _gemv_load times the activations, summed over each group's GS columns."""
    if KIND == 2:
        # q - 8 without an int->float convert (quarter rate): (0x4B000000 | q) is the float 2^23 + q
        lo = ((w & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        hi = ((w >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        acc += tl.sum(lo * xa[None, :, :] + hi * xb[None, :, :], axis=2) * sc
    else:
        acc += tl.sum(w.to(tl.float32) * xa[None, :, :], axis=2)
    return acc


@triton.jit
def _gemv_tile(acc, w_base, s_base, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM,
               KIND: tl.constexpr, GS: tl.constexpr, TR: tl.constexpr = 0):
    """acc [BN, NG] += one weight tile times the activations, summed over each group's GS columns (a [BN, NG, GS]
    accumulator, reduced only at the end, held 3x the registers).

    rows [BN] output rows; gg [NG] group (fp8: 128-block, int4: quant group, bf16: GS chunk) indices;
    kp [NG, GS] stored column of each element, km its bound mask.
    bf16 / fp8: xa [NG, GS] activation at k = kp (fp8: already times the block scale); xb unused.
    int4: xa / xb [NG, GS] activations of the low / high nibbles (k = g*2GS + j and g*2GS + GS + j); TR the
    weight's tile_rows.
    """
    w, sc = _gemv_load(w_base, s_base, rows, rmask, gg, kp, km, stride_wn, stride_sn, KLIM, KIND, GS, TR)
    return _gemv_dot(acc, w, sc, xa, xb, KIND)


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr,
    N, KLIM, NGRP, TOPK,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    KIND: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    TR: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """grid (P, cdiv(N, BN)): h[p, rows] = silu(W_gate[e] x[t]) * (W_up[e] x[t]), e = ids[p], t = p // TOPK."""
    pdl_wait_then_release(PDL)
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + pid_p).to(tl.int64)
    tok = pid_p // TOPK
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    wg = w_ptr + e * stride_we
    wu = wg + N * stride_wn
    if KIND == 1:   # scale row of this tile's 128-row block (BN divides 128, N % 128 == 0)
        sg = s_ptr + e * stride_se + ((pid_n * BN) // 128) * stride_sn
        su = s_ptr + e * stride_se + ((N + pid_n * BN) // 128) * stride_sn
    else:
        sg = s_ptr + e * stride_se
        su = sg + N * stride_sn
    x_row = x_ptr + tok.to(tl.int64) * stride_xm
    acc_g = tl.zeros([BN, NG], dtype=tl.float32)
    acc_u = tl.zeros([BN, NG], dtype=tl.float32)
    j = tl.arange(0, GS)
    for g0 in range(0, NGRP, NG):
        gg = g0 + tl.arange(0, NG)
        kp = gg[:, None] * GS + j[None, :]
        km = kp < KLIM
        if KIND == 2:
            xa = tl.load(x_row + kp + gg[:, None] * GS, mask=km, other=0).to(tl.float32)
            xb = tl.load(x_row + kp + gg[:, None] * GS + GS, mask=km, other=0).to(tl.float32)
            acc_g = _gemv_tile(acc_g, wg, sg, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM, KIND, GS, TR)
            acc_u = _gemv_tile(acc_u, wu, su, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM, KIND, GS, TR)
        elif KIND == 1:
            xa = tl.load(x_row + kp, mask=km, other=0).to(tl.float32)
            gm = gg * GS < KLIM
            xg = xa * tl.load(sg + gg, mask=gm, other=0)[:, None]
            xu = xa * tl.load(su + gg, mask=gm, other=0)[:, None]
            acc_g = _gemv_tile(acc_g, wg, sg, rows, rmask, gg, kp, km, xg, xg, stride_wn, stride_sn, KLIM, KIND, GS, TR)
            acc_u = _gemv_tile(acc_u, wu, su, rows, rmask, gg, kp, km, xu, xu, stride_wn, stride_sn, KLIM, KIND, GS, TR)
        else:
            xa = tl.load(x_row + kp, mask=km, other=0).to(tl.float32)
            acc_g = _gemv_tile(acc_g, wg, sg, rows, rmask, gg, kp, km, xa, xa, stride_wn, stride_sn, KLIM, KIND, GS, TR)
            acc_u = _gemv_tile(acc_u, wu, su, rows, rmask, gg, kp, km, xa, xa, stride_wn, stride_sn, KLIM, KIND, GS, TR)
    gate = tl.sum(acc_g, axis=1)
    up = tl.sum(acc_u, axis=1)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + pid_p.to(tl.int64) * stride_hm + rows, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _down_x(h_row, gg, kp, km, sb, wt, KLIM, KIND: tl.constexpr, GS: tl.constexpr):
    """The down GEMV's activations for one step (h [NG, GS] times the router weight wt, fp8 also times the weight's
    block scales at sb): (xa, xb) as _gemv_tile takes them."""
    if KIND == 2:
        xa = tl.load(h_row + kp + gg[:, None] * GS, mask=km, other=0).to(tl.float32) * wt
        xb = tl.load(h_row + kp + gg[:, None] * GS + GS, mask=km, other=0).to(tl.float32) * wt
        return xa, xb
    xa = tl.load(h_row + kp, mask=km, other=0).to(tl.float32)
    if KIND == 1:
        xa = xa * (tl.load(sb + gg, mask=gg * GS < KLIM, other=0) * wt)[:, None]
    else:
        xa = xa * wt
    return xa, xa


@triton.jit
def _expert_bases(w_ptr, s_ptr, e, pid_n, stride_we, stride_se, stride_sn, KIND: tl.constexpr, BN: tl.constexpr):
    """Expert e's down weights and scales for this program's BN output rows: (weight base, scale base; fp8: the
    scale row of those rows)."""
    sb = s_ptr + e * stride_se
    if KIND == 1:
        sb += ((pid_n * BN) // 128) * stride_sn
    return w_ptr + e * stride_we, sb


@triton.jit
def _moe_gemv_down_kernel(
    h_ptr, w_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr,
    N, KLIM, NGRP, TOPK,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    KIND: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    TR: tl.constexpr = 0, EARLY: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """grid (M, cdiv(N, BN)): out[m, rows] = sum_k tw[m, k] * W_down[ids[m, k]][rows] @ h[m * TOPK + k].
    EARLY (TOPK == 1 and NG * GS covering K: one pair and one step per program, the split mode): the expert id and
    the weight tile are loaded before the PDL wait, as the tensor-core down kernel does (safe for the same reason,
    see triton_moe_gemv_mma.py)."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    acc = tl.zeros([BN, NG], dtype=tl.float32)
    j = tl.arange(0, GS)
    if EARLY:
        e = tl.load(ids_ptr + m, cache_modifier=".cg").to(tl.int64)
        gg = tl.arange(0, NG)
        kp = gg[:, None] * GS + j[None, :]
        km = kp < KLIM
        wb, sb = _expert_bases(w_ptr, s_ptr, e, pid_n, stride_we, stride_se, stride_sn, KIND, BN)
        w, sc = _gemv_load(wb, sb, rows, rmask, gg, kp, km, stride_wn, stride_sn, KLIM, KIND, GS, TR)
        pdl_wait_then_release(PDL)
        xa, xb = _down_x(h_ptr + m.to(tl.int64) * stride_hm, gg, kp, km, sb, tl.load(tw_ptr + m).to(tl.float32),
                         KLIM, KIND, GS)
        acc = _gemv_dot(acc, w, sc, xa, xb, KIND)
    else:
        pdl_wait_then_release(PDL)
        for kk in range(0, TOPK):
            p = m * TOPK + kk
            e = tl.load(ids_ptr + p).to(tl.int64)
            wt = tl.load(tw_ptr + p).to(tl.float32)
            wb, sb = _expert_bases(w_ptr, s_ptr, e, pid_n, stride_we, stride_se, stride_sn, KIND, BN)
            h_row = h_ptr + p.to(tl.int64) * stride_hm
            for g0 in range(0, NGRP, NG):
                gg = g0 + tl.arange(0, NG)
                kp = gg[:, None] * GS + j[None, :]
                km = kp < KLIM
                xa, xb = _down_x(h_row, gg, kp, km, sb, wt, KLIM, KIND, GS)
                acc = _gemv_tile(acc, wb, sb, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM, KIND, GS, TR)
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, out.to(out_ptr.dtype.element_ty), mask=rmask)


def _gemv_cfg(w: KernelWeight, config: dict | None) -> dict:
    """-> dict(bn, ng, gs, warps) for kernel 1 (suffix 1) and kernel 2 (suffix 2) (+ the int4 dot variant's and
    the split mode's: split (None = auto), sbn1, sbn2, sw)."""
    cfg = dict(dict(split=None, sbn1=4, sbn2=16, sw=4), **GEMV_DEFAULTS[w.kind])
    if config:
        cfg.update({k: v for k, v in config.items() if k in cfg})
    for i in ("1", "2"):
        bn, rb = cfg["bn" + i], cfg["rb" + i]
        gs = {BF16: rb, FP8: 128, INT4: w.group // 2}[w.kind]
        if w.kind == FP8 and 128 % bn:
            raise ValueError(f"fp8 GEMV tiles need BN dividing 128, got {bn}")
        cfg["gs" + i], cfg["ng" + i] = gs, max(1, rb // gs)
    return cfg


def _full_k(w: KernelWeight) -> tuple[int, int]:
    """(NG, GS) covering a whole row of w in one step (the latency-bound few-pairs case)."""
    if w.kind == BF16:
        return 1, triton.next_power_of_2(w.klim)
    gs = 128 if w.kind == FP8 else w.group // 2
    return triton.next_power_of_2(triton.cdiv(w.klim, gs)), gs


def _moe_gemv_split(x: Tensor, w13: KernelWeight, w2: KernelWeight, tw: Tensor, ids: Tensor, m: int, top_k: int,
                    cfg: dict, reduce: bool) -> Tensor:
    """Few pairs (batch-1 decode): the cost is latency, not bandwidth, so every program does exactly one step.
    Kernel 1 takes whole rows (BN = sbn1 rows x all of K) per program; the down projection runs one program per
    (pair, sbn2 rows) -- the kernel-2 GEMV with TOPK = 1 -- writing y [P, H] scaled by the router weight, and a
    sum over the k experts finishes. 3 launches instead of 2, but no program loops."""
    p, inter, hidden = m * top_k, w2.k, w2.n
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    ng, gs = _full_k(w13)
    _moe_gemv_gate_up_kernel[(p, triton.cdiv(inter, cfg["sbn1"]))](
        x, w13.data, w13.scale, ids, h,
        inter, w13.klim, triton.cdiv(w13.klim, gs), top_k,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        KIND=w13.kind, BN=cfg["sbn1"], NG=ng, GS=gs, TR=w13.tile_rows, num_warps=cfg["sw"], **pdl_launch())
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    ng, gs = _full_k(w2)
    _moe_gemv_down_kernel[(p, triton.cdiv(hidden, cfg["sbn2"]))](
        h, w2.data, w2.scale, ids, tw, y,
        hidden, w2.klim, triton.cdiv(w2.klim, gs), 1,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), y.stride(0),
        KIND=w2.kind, BN=cfg["sbn2"], NG=ng, GS=gs, TR=w2.tile_rows, EARLY=triton_moe_gemv_mma.EARLY_DOWN_LOAD,
        num_warps=cfg["sw"], **pdl_launch())
    return _split_result(y, m, top_k, reduce)


def _split_result(y: Tensor, m: int, top_k: int, reduce: bool) -> Tensor:
    """Split mode's per-expert outputs y [M*k, H] -> [M, H] summed over the k experts, or [M, k, H]."""
    y = y.view(m, top_k, -1)
    return y.sum(dim=1) if reduce else y


def moe_gemv(x: Tensor, w13: KernelWeight, w2: KernelWeight, topk_weights: Tensor, topk_ids: Tensor,
             config: dict | None = None, reduce: bool = True) -> Tensor:
    """Decode path; x [M, H] -> [M, H] (or [M, k, H] unsummed when not reduce). See the module docstring."""
    m, top_k = topk_ids.shape
    p, inter, hidden = m * top_k, w2.k, w2.n
    cfg = _gemv_cfg(w13, config)
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    split = cfg["split"] if cfg["split"] is not None else p <= SPLIT_MAX_PAIRS
    if cfg.get("mma") is True or (cfg.get("mma") == "split" and split):
        out = mma_gemv(x, w13, w2, tw, ids, m, top_k, cfg, split)
        return _split_result(out, m, top_k, reduce) if split else out
    if split:
        return _moe_gemv_split(x, w13, w2, tw, ids, m, top_k, cfg, reduce)
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    _moe_gemv_gate_up_kernel[(p, triton.cdiv(inter, cfg["bn1"]))](
        x, w13.data, w13.scale, ids, h,
        inter, w13.klim, triton.cdiv(w13.klim, cfg["gs1"]), top_k,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        KIND=w13.kind, BN=cfg["bn1"], NG=cfg["ng1"], GS=cfg["gs1"], TR=w13.tile_rows,
        num_warps=cfg["w1"], **pdl_launch())
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    _moe_gemv_down_kernel[(m, triton.cdiv(hidden, cfg["bn2"]))](
        h, w2.data, w2.scale, ids, tw, out,
        hidden, w2.klim, triton.cdiv(w2.klim, cfg["gs2"]), top_k,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), out.stride(0),
        KIND=w2.kind, BN=cfg["bn2"], NG=cfg["ng2"], GS=cfg["gs2"], TR=w2.tile_rows, num_warps=cfg["w2"], **pdl_launch())
    return out
