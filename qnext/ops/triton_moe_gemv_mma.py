"""Fused MoE GEMV for int4 and fp8 experts on tensor cores, with K split across the MMA's columns.

A GEMV has one activation vector, but an MMA wants 16 columns (N >= 16), so a plain tensor-core GEMV wastes 15 of
them (and Triton's MMA layout for a 16-row activation tile gives every warp a copy of the weight tile). Here the
weights are the A operand and the K axis is folded into the columns: A row a = (r, s) is weight row r's s-th slice
of KSU stored units (int4: bytes, two weights each; fp8: one weight), and column c of the B operand holds the
activations of slice c. The product's diagonal entries (a's slice == c) are the per-slice partial dots; a sum over
the S slices gives the row's output. So a [BM*S, KSU] tile covers BM rows x S*KSU units in one MMA, x is read once
per program, and the registers per thread stay low enough for many programs per SM (the latency-bound batch-1 step
needs bytes in flight, not FLOPs). Every slice lies inside one scale group along K (KSU divides GU: int4 G/2 bytes,
fp8 the 128-column block), so its scale multiplies its partial dot.

int4 layout (triton_moe_weights.py): byte o of group g holds weight g*G + o (low nibble) and g*G + G/2 + o (high).
fp8: [E, N, K] e4m3 with f32 scales [E, N/128, K/128]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.triton_moe_weights import (FP8, INT4_DQ_CONVERT, KernelWeight, fp8_to, int4_dq, int4_row_offsets,
                                          int4_scale_group_offsets, int4_scale_row_offsets, int4_unit_offsets)

Tensor = torch.Tensor

# The down kernel loads its expert's weight tile before the PDL wait when a program has one pair and one step (the
# batch-1 split mode); False for A/B runs.
EARLY_DOWN_LOAD = True


@triton.jit
def _x_slices(x_row, ku0, KU, S: tl.constexpr, KSU: tl.constexpr, GU: tl.constexpr, IS_FP8: tl.constexpr):
    """-> (x_a, x_b) [KSU, 16]: column c < S holds the activations of units ku0 + c*KSU + [0, KSU) (int4: of the
    low / high nibbles; fp8: x_a, and x_b is the same); columns >= S are zero."""
    c = tl.arange(0, 16)
    u = ku0 + c[None, :] * KSU + tl.arange(0, KSU)[:, None]     # [KSU, 16]
    xm = (c[None, :] < S) & (u < KU)
    if IS_FP8:
        x_a = tl.load(x_row + u, mask=xm, other=0.0)
        return x_a, x_a
    xi = (u // GU) * (2 * GU) + u % GU
    return tl.load(x_row + xi, mask=xm, other=0.0), tl.load(x_row + xi + GU, mask=xm, other=0.0)


@triton.jit
def _slice_tile(w_rows, s_rows, rmask, ku0, KU, S: tl.constexpr, KSU: tl.constexpr, GU: tl.constexpr,
                BMS: tl.constexpr, IS_FP8: tl.constexpr, TR: tl.constexpr):
    """The weight tile of _slice_dots: (stored units [BMS, KSU], each A row's group scale [BMS] float32)."""
    a = tl.arange(0, BMS)
    ua = ku0 + (a % S) * KSU                              # first unit of each A row's slice
    am = rmask & (ua < KU)                                # KU % GU == 0: a slice is wholly in or out
    ptrs = w_rows[:, None] + int4_unit_offsets(ua, TR, GU)[:, None] + tl.arange(0, KSU)[None, :]
    if IS_FP8:                                            # zeros, not garbage (which may be an fp8 NaN)
        p = tl.load(ptrs, mask=am[:, None], other=0.0)
    else:
        p = tl.load(ptrs, mask=am[:, None], other=0)
    return p, tl.load(s_rows + int4_scale_group_offsets(ua // GU, TR), mask=am, other=0).to(tl.float32)


@triton.jit
def _tile_dots(p, sc, x_a, x_b, S: tl.constexpr, BMS: tl.constexpr, IS_FP8: tl.constexpr):
    """-> [BMS] float32: each A row's partial dot (its slice of the tile p against x_a / x_b) times its scale sc."""
    if INT4_DQ_CONVERT:                                   # under the interpreter (see triton_moe_weights.py)
        if IS_FP8:
            part = tl.dot(p.to(tl.float32), x_a.to(tl.float32))
        else:
            lo, hi = int4_dq(p, x_a.dtype)
            part = tl.dot(lo.to(tl.float32), x_a.to(tl.float32)) + tl.dot(hi.to(tl.float32), x_b.to(tl.float32))
    elif IS_FP8:
        part = tl.dot(fp8_to(p, x_a.dtype), x_a)          # [BMS, 16]
    else:
        lo, hi = int4_dq(p, x_a.dtype)                    # [BMS, KSU]
        part = tl.dot(lo, x_a) + tl.dot(hi, x_b)          # [BMS, 16]
    c = tl.arange(0, 16)
    diag = tl.sum(tl.where(c[None, :] == (tl.arange(0, BMS) % S)[:, None], part, 0.0), axis=1)
    return diag * sc


@triton.jit
def _slice_dots(w_rows, s_rows, rmask, ku0, KU, x_a, x_b, S: tl.constexpr, KSU: tl.constexpr, GU: tl.constexpr,
                BMS: tl.constexpr, IS_FP8: tl.constexpr, TR: tl.constexpr):
    """-> [BMS] float32: A row a = (r, s)'s partial dot (units ku0 + s*KSU + [0, KSU) of its weight row) times its
    group scale. w_rows / s_rows [BMS]: each A row's weight-row / scale-row pointer; rmask [BMS] its row bound; TR
    the int4 tile_rows (0 for fp8)."""
    p, sc = _slice_tile(w_rows, s_rows, rmask, ku0, KU, S, KSU, GU, BMS, IS_FP8, TR)
    return _tile_dots(p, sc, x_a, x_b, S, BMS, IS_FP8)


@triton.jit
def _weight_rows(w_ptr, e, rows, stride_we, stride_wn, GU: tl.constexpr, TR: tl.constexpr):
    """Pointer to each weight row's first stored unit (int4 tiles: its place in its first group's tile)."""
    return w_ptr + e * stride_we + int4_row_offsets(rows, stride_wn, TR, GU)


@triton.jit
def _scale_rows(s_ptr, e, rows, stride_se, stride_sn, IS_FP8: tl.constexpr, TR: tl.constexpr):
    """Scale-row pointer of each weight row: int4 one per row, fp8 one per 128-row block."""
    if IS_FP8:
        return s_ptr + e * stride_se + (rows // 128) * stride_sn
    return s_ptr + e * stride_se + int4_scale_row_offsets(rows, stride_sn, TR)


@triton.jit
def _moe_mma_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr,
    N, KU, TOPK,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    BM: tl.constexpr, S: tl.constexpr, KSU: tl.constexpr, GU: tl.constexpr, IS_FP8: tl.constexpr,
    TR: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """grid (P, cdiv(N, BM)): h[p, rows] = silu(W_gate[e] x[t]) * (W_up[e] x[t]), e = ids[p], t = p // TOPK.
    KU stored units per weight row."""
    pdl_wait_then_release(PDL)
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + pid_p).to(tl.int64)
    x_row = x_ptr + (pid_p // TOPK).to(tl.int64) * stride_xm
    rows = pid_n * BM + tl.arange(0, BM * S) // S          # [BM*S]: each weight row S times
    rmask = rows < N
    wg = _weight_rows(w_ptr, e, rows, stride_we, stride_wn, GU, TR)
    wu = _weight_rows(w_ptr, e, rows + N, stride_we, stride_wn, GU, TR)
    sg = _scale_rows(s_ptr, e, rows, stride_se, stride_sn, IS_FP8, TR)
    su = _scale_rows(s_ptr, e, rows + N, stride_se, stride_sn, IS_FP8, TR)
    acc_g = tl.zeros([BM * S], dtype=tl.float32)
    acc_u = tl.zeros([BM * S], dtype=tl.float32)
    for ku0 in range(0, KU, S * KSU):
        ku0 = tl.multiple_of(ku0, S * KSU)              # lets the loads vectorize
        x_a, x_b = _x_slices(x_row, ku0, KU, S, KSU, GU, IS_FP8)
        acc_g += _slice_dots(wg, sg, rmask, ku0, KU, x_a, x_b, S, KSU, GU, BM * S, IS_FP8, TR)
        acc_u += _slice_dots(wu, su, rmask, ku0, KU, x_a, x_b, S, KSU, GU, BM * S, IS_FP8, TR)
    gate = tl.sum(tl.reshape(acc_g, [BM, S]), axis=1)
    up = tl.sum(tl.reshape(acc_u, [BM, S]), axis=1)
    h = gate * tl.sigmoid(gate) * up
    out_rows = pid_n * BM + tl.arange(0, BM)
    tl.store(h_ptr + pid_p.to(tl.int64) * stride_hm + out_rows, h.to(h_ptr.dtype.element_ty), mask=out_rows < N)


@triton.jit
def _moe_mma_down_kernel(
    h_ptr, w_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr,
    N, KU, TOPK,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    BM: tl.constexpr, S: tl.constexpr, KSU: tl.constexpr, GU: tl.constexpr, IS_FP8: tl.constexpr,
    EARLY: tl.constexpr = False, TR: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """grid (M, cdiv(N, BM)): out[m, rows] = sum_k tw[m, k] * W_down[ids[m, k]][rows] @ h[m * TOPK + k].
    EARLY (TOPK == 1 and S * KSU >= KU: one pair and one step per program): the expert id and the weight tile are
    loaded before the PDL wait, overlapping the gate_up kernel before this one. Safe because the ids are never
    written by the kernel launched right before this one: gate_up reads them after its own wait, so they were
    complete before any gate_up program released this kernel (see qnext/ops/pdl.py); weights are never written."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM * S) // S
    rmask = rows < N
    if EARLY:
        e = tl.load(ids_ptr + m, cache_modifier=".cg").to(tl.int64)
        p, sc = _slice_tile(_weight_rows(w_ptr, e, rows, stride_we, stride_wn, GU, TR),
                            _scale_rows(s_ptr, e, rows, stride_se, stride_sn, IS_FP8, TR), rmask, 0, KU, S, KSU, GU,
                            BM * S, IS_FP8, TR)
        pdl_wait_then_release(PDL)
        x_a, x_b = _x_slices(h_ptr + m.to(tl.int64) * stride_hm, 0, KU, S, KSU, GU, IS_FP8)
        acc = _tile_dots(p, sc, x_a, x_b, S, BM * S, IS_FP8) * tl.load(tw_ptr + m).to(tl.float32)
    else:
        pdl_wait_then_release(PDL)
        acc = tl.zeros([BM * S], dtype=tl.float32)
        for kk in range(0, TOPK):
            p = m * TOPK + kk
            e = tl.load(ids_ptr + p).to(tl.int64)
            wt = tl.load(tw_ptr + p).to(tl.float32)
            h_row = h_ptr + p.to(tl.int64) * stride_hm
            wb = _weight_rows(w_ptr, e, rows, stride_we, stride_wn, GU, TR)
            sb = _scale_rows(s_ptr, e, rows, stride_se, stride_sn, IS_FP8, TR)
            for ku0 in range(0, KU, S * KSU):
                ku0 = tl.multiple_of(ku0, S * KSU)
                x_a, x_b = _x_slices(h_row, ku0, KU, S, KSU, GU, IS_FP8)
                acc += _slice_dots(wb, sb, rmask, ku0, KU, x_a, x_b, S, KSU, GU, BM * S, IS_FP8, TR) * wt
    out = tl.sum(tl.reshape(acc, [BM, S]), axis=1)
    out_rows = pid_n * BM + tl.arange(0, BM)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + out_rows, out.to(out_ptr.dtype.element_ty), mask=out_rows < N)


def _slicing(w: KernelWeight, bm: int, warps: int, ksu: int | None) -> tuple[int, int, int, int, int]:
    """-> (BM, S, KSU, GU, warps): slices of KSU units (16 <= KSU <= GU, a power of two dividing GU; the given one
    capped at GU, by default the smallest that lets 16 slices cover a row), S slices per row (<= 16); BM rows so
    that the A tile has >= 16 rows per warp (fewer would make warps repeat each other's MMA)."""
    gu = 128 if w.kind == FP8 else w.group // 2
    ksu = min(gu, ksu or max(16, triton.next_power_of_2(triton.cdiv(w.klim, 16))))
    if gu % ksu or ksu < 16:
        raise ValueError(f"MMA GEMV slices of {ksu} units need 16 <= KSU dividing the scale group ({gu} units)")
    s = min(16, triton.next_power_of_2(triton.cdiv(w.klim, ksu)))
    bm = max(bm, triton.cdiv(16, s))
    return bm, s, ksu, gu, max(1, min(warps, bm * s // 16))


def mma_gemv(x: Tensor, w13: KernelWeight, w2: KernelWeight, tw: Tensor, ids: Tensor, m: int, top_k: int,
             cfg: dict, split: bool) -> Tensor:
    """x [M, H] -> [M, H], or [M*k, H] per-expert outputs (router-weighted, unsummed) when split: the down
    projection then runs one program per (pair, rows) instead of looping over the k experts -- more programs for the
    latency-bound few-pairs case. ids / tw flat [M*k]; int4 or fp8 weights. cfg keys: mbm1, mw1, mbm2, mw2 (rows
    and warps per program of the two kernels), mks1 / mks2 (slice units of gate_up / down; None = auto), mst
    (pipeline stages)."""
    p, inter, hidden = m * top_k, w2.k, w2.n
    fp8 = w13.kind == FP8
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    bm, s, ksu, gu, warps = _slicing(w13, cfg["mbm1"], cfg["mw1"], cfg["mks1"])
    _moe_mma_gate_up_kernel[(p, triton.cdiv(inter, bm))](
        x, w13.data, w13.scale, ids, h, inter, w13.klim, top_k,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        BM=bm, S=s, KSU=ksu, GU=gu, IS_FP8=fp8, TR=w13.tile_rows, num_warps=warps, num_stages=cfg["mst"],
        **pdl_launch())
    rows_out, k_loop = (p, 1) if split else (m, top_k)
    out = torch.empty(rows_out, hidden, dtype=x.dtype, device=x.device)
    bm, s, ksu, gu, warps = _slicing(w2, cfg["mbm2"], cfg["mw2"], cfg["mks2"])
    _moe_mma_down_kernel[(rows_out, triton.cdiv(hidden, bm))](
        h, w2.data, w2.scale, ids, tw, out, hidden, w2.klim, k_loop,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), out.stride(0),
        BM=bm, S=s, KSU=ksu, GU=gu, IS_FP8=fp8, EARLY=EARLY_DOWN_LOAD and k_loop == 1 and s * ksu >= w2.klim,
        TR=w2.tile_rows, num_warps=warps, num_stages=cfg["mst"], **pdl_launch())
    return out
