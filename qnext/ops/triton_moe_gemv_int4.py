"""Fused MoE GEMV for int4 experts on tensor cores, with K split across the MMA's columns.

A GEMV has one activation vector, but an MMA wants 16 columns (N >= 16), so a plain tensor-core GEMV wastes 15 of
them (and Triton's MMA layout for a 16-row activation tile gives every warp a copy of the weight tile). Here the
weights are the A operand and the K axis is folded into the columns: A row a = (r, s) is weight row r's s-th slice
of KS2 bytes (2*KS2 weights), and column c of the B operand holds the activations of slice c. The product's
diagonal entries (a's slice == c) are the per-slice partial dots; a sum over the S slices gives the row's output.
So a [BM*S, KS2] tile covers BM rows x S*KS2 bytes in one MMA, x is read once per program, and the registers
per thread stay low enough for several programs per SM (the latency-bound batch-1 step needs bytes in flight, not
FLOPs). Every slice lies inside one quant group (KS2 divides G/2), so its scale multiplies its partial dot.

int4 layout (triton_moe_weights.py): byte o of group g holds weight g*G + o (low nibble) and g*G + G/2 + o (high)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.triton_moe_weights import INT4_DQ_CONVERT, KernelWeight, int4_dq

Tensor = torch.Tensor


@triton.jit
def _x_slices(x_row, kb0, KB, S: tl.constexpr, KS2: tl.constexpr, G2: tl.constexpr):
    """-> (x_lo, x_hi) [KS2, 16]: column c < S holds the activations of the low / high nibbles of bytes
    kb0 + c*KS2 + [0, KS2); columns >= S are zero."""
    c = tl.arange(0, 16)
    b = kb0 + c[None, :] * KS2 + tl.arange(0, KS2)[:, None]     # [KS2, 16]
    xm = (c[None, :] < S) & (b < KB)
    xi = (b // G2) * (2 * G2) + b % G2
    return tl.load(x_row + xi, mask=xm, other=0.0), tl.load(x_row + xi + G2, mask=xm, other=0.0)


@triton.jit
def _slice_dots(w_rows, s_rows, rmask, kb0, KB, x_lo, x_hi, S: tl.constexpr, KS2: tl.constexpr, G2: tl.constexpr,
                BMS: tl.constexpr):
    """-> [BMS] float32: A row a = (r, s)'s partial dot (bytes kb0 + s*KS2 + [0, KS2) of its weight row) times its
    group scale. w_rows / s_rows [BMS]: each A row's weight-row / scale-row pointer; rmask [BMS] its row bound."""
    a = tl.arange(0, BMS)
    sa = a % S
    ba = kb0 + sa * KS2                                   # first byte of each A row's slice
    am = rmask & (ba < KB)                                # KB % G2 == 0: a slice is wholly in or out
    p = tl.load(w_rows[:, None] + ba[:, None] + tl.arange(0, KS2)[None, :], mask=am[:, None], other=0)
    lo, hi = int4_dq(p, x_lo.dtype)                       # [BMS, KS2]
    if INT4_DQ_CONVERT:                                   # under the interpreter (see triton_moe_weights.py)
        part = tl.dot(lo.to(tl.float32), x_lo.to(tl.float32)) + tl.dot(hi.to(tl.float32), x_hi.to(tl.float32))
    else:
        part = tl.dot(lo, x_lo) + tl.dot(hi, x_hi)        # [BMS, 16]
    c = tl.arange(0, 16)
    diag = tl.sum(tl.where(c[None, :] == sa[:, None], part, 0.0), axis=1)
    return diag * tl.load(s_rows + ba // G2, mask=am, other=0).to(tl.float32)


@triton.jit
def _int4_mma_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr,
    N, KB, TOPK,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    BM: tl.constexpr, S: tl.constexpr, KS2: tl.constexpr, G2: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """grid (P, cdiv(N, BM)): h[p, rows] = silu(W_gate[e] x[t]) * (W_up[e] x[t]), e = ids[p], t = p // TOPK.
    KB = K / 2 bytes per weight row."""
    pdl_wait_then_release(PDL)
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + pid_p).to(tl.int64)
    x_row = x_ptr + (pid_p // TOPK).to(tl.int64) * stride_xm
    rows = pid_n * BM + tl.arange(0, BM * S) // S          # [BM*S]: each weight row S times
    rmask = rows < N
    wg = w_ptr + e * stride_we + rows * stride_wn
    sg = s_ptr + e * stride_se + rows * stride_sn
    acc_g = tl.zeros([BM * S], dtype=tl.float32)
    acc_u = tl.zeros([BM * S], dtype=tl.float32)
    for kb0 in range(0, KB, S * KS2):
        kb0 = tl.multiple_of(kb0, S * KS2)              # lets the loads vectorize
        x_lo, x_hi = _x_slices(x_row, kb0, KB, S, KS2, G2)
        acc_g += _slice_dots(wg, sg, rmask, kb0, KB, x_lo, x_hi, S, KS2, G2, BM * S)
        acc_u += _slice_dots(wg + N * stride_wn, sg + N * stride_sn, rmask, kb0, KB, x_lo, x_hi, S, KS2, G2, BM * S)
    gate = tl.sum(tl.reshape(acc_g, [BM, S]), axis=1)
    up = tl.sum(tl.reshape(acc_u, [BM, S]), axis=1)
    h = gate * tl.sigmoid(gate) * up
    out_rows = pid_n * BM + tl.arange(0, BM)
    tl.store(h_ptr + pid_p.to(tl.int64) * stride_hm + out_rows, h.to(h_ptr.dtype.element_ty), mask=out_rows < N)


@triton.jit
def _int4_mma_down_kernel(
    h_ptr, w_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr,
    N, KB, TOPK,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    BM: tl.constexpr, S: tl.constexpr, KS2: tl.constexpr, G2: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """grid (M, cdiv(N, BN)): out[m, rows] = sum_k tw[m, k] * W_down[ids[m, k]][rows] @ h[m * TOPK + k]."""
    pdl_wait_then_release(PDL)
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM * S) // S
    rmask = rows < N
    acc = tl.zeros([BM * S], dtype=tl.float32)
    for kk in range(0, TOPK):
        p = m * TOPK + kk
        e = tl.load(ids_ptr + p).to(tl.int64)
        wt = tl.load(tw_ptr + p).to(tl.float32)
        h_row = h_ptr + p.to(tl.int64) * stride_hm
        wb = w_ptr + e * stride_we + rows * stride_wn
        sb = s_ptr + e * stride_se + rows * stride_sn
        for kb0 in range(0, KB, S * KS2):
            kb0 = tl.multiple_of(kb0, S * KS2)
            x_lo, x_hi = _x_slices(h_row, kb0, KB, S, KS2, G2)
            acc += _slice_dots(wb, sb, rmask, kb0, KB, x_lo, x_hi, S, KS2, G2, BM * S) * wt
    out = tl.sum(tl.reshape(acc, [BM, S]), axis=1)
    out_rows = pid_n * BM + tl.arange(0, BM)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + out_rows, out.to(out_ptr.dtype.element_ty), mask=out_rows < N)


def _slicing(w: KernelWeight, bm: int, warps: int, ks2: int | None) -> tuple[int, int, int, int]:
    """-> (BM, S, KS2, warps): slices of KS2 bytes (16 <= KS2 <= G/2, a power of two dividing G/2; the given one
    capped at G/2, by default the smallest that lets 16 slices cover a row), S slices per row (<= 16); BM rows so that the A tile has >= 16 rows
    per warp (fewer would make warps repeat each other's MMA)."""
    kb, g2 = w.k // 2, w.group // 2
    ks2 = min(g2, ks2 or max(16, triton.next_power_of_2(triton.cdiv(kb, 16))))
    if g2 % ks2 or ks2 < 16:
        raise ValueError(f"int4 MMA GEMV slices of {ks2} bytes need 16 <= KS2 dividing G/2 = {g2}")
    s = min(16, triton.next_power_of_2(triton.cdiv(kb, ks2)))
    bm = max(bm, triton.cdiv(16, s))
    return bm, s, ks2, max(1, min(warps, bm * s // 16))


def int4_mma_gemv(x: Tensor, w13: KernelWeight, w2: KernelWeight, tw: Tensor, ids: Tensor, m: int, top_k: int,
                  cfg: dict, split: bool) -> Tensor:
    """x [M, H] -> [M, H], or [M*k, H] per-expert outputs (router-weighted, unsummed) when split: the down
    projection then runs one program per (pair, rows) instead of looping over the k experts -- more programs for the
    latency-bound few-pairs case. ids / tw flat [M*k]. cfg keys: mbm1, mw1, mbm2, mw2 (rows and warps per program
    of the two kernels), mks2 (slice bytes of the down projection; None = auto), mst (pipeline stages)."""
    p, inter, hidden = m * top_k, w2.k, w2.n
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    bm, s, ks2, warps = _slicing(w13, cfg["mbm1"], cfg["mw1"], None)
    _int4_mma_gate_up_kernel[(p, triton.cdiv(inter, bm))](
        x, w13.data, w13.scale, ids, h, inter, w13.k // 2, top_k,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        BM=bm, S=s, KS2=ks2, G2=w13.group // 2, num_warps=warps, num_stages=cfg["mst"], **pdl_launch())
    rows_out, k_loop = (p, 1) if split else (m, top_k)
    out = torch.empty(rows_out, hidden, dtype=x.dtype, device=x.device)
    bm, s, ks2, warps = _slicing(w2, cfg["mbm2"], cfg["mw2"], cfg["mks2"])
    _int4_mma_down_kernel[(rows_out, triton.cdiv(hidden, bm))](
        h, w2.data, w2.scale, ids, tw, out, hidden, w2.k // 2, k_loop,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), out.stride(0),
        BM=bm, S=s, KS2=ks2, G2=w2.group // 2, num_warps=warps, num_stages=cfg["mst"], **pdl_launch())
    return out
