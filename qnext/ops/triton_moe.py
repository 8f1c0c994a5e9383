"""Fused MoE for the routed experts (Triton): gate_up -> silu(gate) * up -> down, weighted by the router.

Weights (any of the three formats in qnext.ops.quant, the same format for both):
    w13 [E, 2I, H] (gate rows first, as transformers fuses them), w2 [E, H, I]
    bf16/fp16 tensors | Fp8BlockWeight (e4m3 + 128x128 scale_inv) | Int4GroupWeight (packed nibbles + bf16 scales)
Routing: topk_ids [M, k] (int32/int64), topk_weights [M, k] float32 (already renormalised).
Reference: qnext.ops.quant.moe_forward_ref (float32 over dequantized weights).

Two paths, chosen by the number of (token, expert) pairs P = M * k (GEMV_MAX_PAIRS, measured on H100):
* "gemv" (decode): no sorting, no torch bookkeeping, so it sits in a CUDA graph as 2-3 launches.
  - split mode (P <= SPLIT_MAX_PAIRS, i.e. batch <= 3 at top-10; latency bound): kernel 1 gives each program whole
    rows (4 rows x all of K) of one pair's gate and up, writing h = silu(g) * u [P, I]; kernel 2 runs one program
    per (pair, 16 rows of H) writing tw * W_down h [P, H]; a sum over the k experts finishes. No program loops.
  - otherwise kernel 1 streams BN-row blocks of (pair, expert) over K, kernel 2 runs one program per (token, BN rows)
    looping over its k experts, so the router-weighted sum stays in registers (deterministic, no atomics).
  bf16/fp8/int4 on CUDA cores keep a [BN, NG, GS] float32 accumulator reduced once at the end, weights dequantized
  in registers; int4 outside split mode uses tensor cores instead (_moe_gemv_int4_dot_*: the token is row 0 of a
  16-row tl.dot, one quant group per step, fewer instructions per weight byte).
* "sorted" (prefill): pairs are grouped by expert and padded to BM rows (moe_align, torch ops, no host sync); a
  grouped GEMM with tl.dot runs per (BM block, BN block) of each expert. gate_up writes h in sorted order, down
  multiplies by the router weight and writes y [P, H] by pair; y.view(M, k, H).sum(1) finishes.
  fp8 tiles are converted to bf16 and the 128x128 block scale multiplies the tile's partial product (BK = 128); int4
  tiles (BK = group) become exact q - 8 in bf16 through a bit trick (no int->float converts), the two nibble halves
  of the group go through two dots, and the group scale multiplies the partial product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qnext.ops.quant import Fp8BlockWeight, Int4GroupWeight, QuantWeight

Tensor = torch.Tensor

BF16, FP8, INT4 = 0, 1, 2

# GEMV tiles per weight kind: BN rows x RB stored units of K per step (elements for bf16/fp8, bytes for int4),
# split into NG groups of GS units (fp8: GS = 128, the scale block; int4: GS = group / 2 bytes, one scale; bf16:
# NG = 1). Kernel 1 (gate_up) loads two such tiles per step, kernel 2 (down) one. Overridable per call through
# `config` (keys bn1, rb1, w1, bn2, rb2, w2); tuned by scripts/gpu_check.py.
GEMV_DEFAULTS = {
    BF16: dict(bn1=16, rb1=256, w1=4, bn2=16, rb2=512, w2=4),
    FP8: dict(bn1=16, rb1=512, w1=4, bn2=16, rb2=512, w2=4),
    INT4: dict(bn1=16, rb1=256, w1=4, bn2=16, rb2=256, w2=4,
               int4_dot=True, dbn1=32, dw1=4, dbn2=32, dw2=4, dst=3),     # tensor-core GEMV (int4_dot)
}
# Grouped-GEMM tiles: gate_up (bn, warps, stages) and down (bn2, warps2, stages2); bm from the tokens per expert
# unless given; bk = 64 (bf16), 128 (fp8 block), group (int4). Chosen without spills (ptxas report) and by
# scripts/gpu_check.py timings; overridable per call through `config`.
SORTED_DEFAULTS = {
    BF16: dict(bk=64, bn=128, warps=4, stages=4, bn2=128, warps2=4, stages2=4),
    FP8: dict(bk=128, bn=64, warps=4, stages=3, bn2=128, warps2=4, stages2=4),
    INT4: dict(bk=None, bn=32, warps=4, stages=3, bn2=128, warps2=4, stages2=4),
}
# auto picks the GEMV path up to this many (token, expert) pairs (H100: GEMV beat sorted at M = 8 and 32 tokens x
# top-10 for bf16/int4, at M = 8 but not 32 for fp8), and within it the one-step-per-program split mode up to
# SPLIT_MAX_PAIRS (M <= 3: latency bound; it lost at M = 8 except bf16).
GEMV_MAX_PAIRS = {BF16: 320, FP8: 160, INT4: 320}
SPLIT_MAX_PAIRS = 32


@dataclass
class _KW:
    """Kernel view of one stacked expert weight."""
    kind: int
    data: Tensor           # bf16 [E, N, K] | fp8 [E, N, K] | uint8 [E, N, K/2]
    scale: Tensor          # fp8: [E, N/128, K/128] f32 | int4: [E, N, K/G] bf16 | bf16: data (unused)
    n: int
    k: int                 # logical K
    group: int             # int4 group (elements) / fp8 block; 0 for bf16

    @property
    def klim(self) -> int:  # stored units per row
        return self.k // 2 if self.kind == INT4 else self.k


def _kernel_view(w: QuantWeight) -> _KW:
    if isinstance(w, Fp8BlockWeight):
        e, n, k = w.w.shape
        if w.block != 128 or n % 128 or k % 128:
            raise ValueError(f"fp8 MoE kernels need 128x128 blocks and N, K multiples of 128, got {n}x{k}/{w.block}")
        return _KW(FP8, w.w.contiguous(), w.scale_inv.float().contiguous(), n, k, 128)
    if isinstance(w, Int4GroupWeight):
        e, n, kh = w.qweight.shape
        return _KW(INT4, w.qweight.contiguous(), w.scale.contiguous(), n, 2 * kh, w.group_size)
    if w.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"MoE kernels take bf16/fp16/fp8/int4 weights, got {w.dtype}")
    w = w.contiguous()
    return _KW(BF16, w, w, w.shape[1], w.shape[2], 0)


# ---- GEMV path ---------------------------------------------------------------------------------------------------

@triton.jit
def _int4_dq(p, DT: tl.constexpr):
    """uint8 tile -> (low, high) nibbles as q - 8 in DT (bf16 or fp16) without int->float converts (those run at
    quarter rate): the bf16 with bits 0x4300 | q is 128 + q exactly (fp16: 0x6400 | q is 1024 + q), and the
    subtraction is exact. Both use packed HADD2 on sm90."""
    if DT == tl.float16:
        lo = (((p & 0xF).to(tl.int16) | 0x6400).to(tl.int16)).to(tl.float16, bitcast=True) - 1032.0
        hi = (((p >> 4).to(tl.int16) | 0x6400).to(tl.int16)).to(tl.float16, bitcast=True) - 1032.0
    else:
        lo = (((p & 0xF).to(tl.int16) | 0x4300).to(tl.int16)).to(tl.bfloat16, bitcast=True) - 136.0
        hi = (((p >> 4).to(tl.int16) | 0x4300).to(tl.int16)).to(tl.bfloat16, bitcast=True) - 136.0
    return lo.to(DT), hi.to(DT)


@triton.jit
def _gemv_tile(acc, w_base, s_base, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM,
               KIND: tl.constexpr, GS: tl.constexpr):
    """acc [BN, NG, GS] += one weight tile times the activations.

    rows [BN] output rows; gg [NG] group (fp8: 128-block, int4: quant group, bf16: GS chunk) indices;
    kp [NG, GS] stored column of each element, km its bound mask.
    bf16 / fp8: xa [NG, GS] activation at k = kp (fp8: already times the block scale); xb unused.
    int4: xa / xb [NG, GS] activations of the low / high nibbles (k = g*2GS + j and g*2GS + GS + j).
    """
    ptrs = w_base + rows[:, None, None] * stride_wn + kp[None, :, :]
    mask = rmask[:, None, None] & km[None, :, :]
    if KIND == 2:
        p = tl.load(ptrs, mask=mask, other=0)
        # q - 8 without an int->float convert (quarter rate): (0x4B000000 | q) is the float 2^23 + q
        lo = ((p & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        hi = ((p >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        sc = tl.load(s_base + rows[:, None] * stride_sn + gg[None, :],
                     mask=rmask[:, None] & (gg * GS < KLIM)[None, :], other=0).to(tl.float32)
        acc += (lo * xa[None, :, :] + hi * xb[None, :, :]) * sc[:, :, None]
    else:
        w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += w * xa[None, :, :]
    return acc


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr,
    N, KLIM, NGRP, TOPK,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    KIND: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
):
    """grid (P, cdiv(N, BN)): h[p, rows] = silu(W_gate[e] x[t]) * (W_up[e] x[t]), e = ids[p], t = p // TOPK."""
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
    acc_g = tl.zeros([BN, NG, GS], dtype=tl.float32)
    acc_u = tl.zeros([BN, NG, GS], dtype=tl.float32)
    j = tl.arange(0, GS)
    for g0 in range(0, NGRP, NG):
        gg = g0 + tl.arange(0, NG)
        kp = gg[:, None] * GS + j[None, :]
        km = kp < KLIM
        if KIND == 2:
            xa = tl.load(x_row + kp + gg[:, None] * GS, mask=km, other=0).to(tl.float32)
            xb = tl.load(x_row + kp + gg[:, None] * GS + GS, mask=km, other=0).to(tl.float32)
            acc_g = _gemv_tile(acc_g, wg, sg, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM, KIND, GS)
            acc_u = _gemv_tile(acc_u, wu, su, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM, KIND, GS)
        elif KIND == 1:
            xa = tl.load(x_row + kp, mask=km, other=0).to(tl.float32)
            gm = gg * GS < KLIM
            xg = xa * tl.load(sg + gg, mask=gm, other=0)[:, None]
            xu = xa * tl.load(su + gg, mask=gm, other=0)[:, None]
            acc_g = _gemv_tile(acc_g, wg, sg, rows, rmask, gg, kp, km, xg, xg, stride_wn, stride_sn, KLIM, KIND, GS)
            acc_u = _gemv_tile(acc_u, wu, su, rows, rmask, gg, kp, km, xu, xu, stride_wn, stride_sn, KLIM, KIND, GS)
        else:
            xa = tl.load(x_row + kp, mask=km, other=0).to(tl.float32)
            acc_g = _gemv_tile(acc_g, wg, sg, rows, rmask, gg, kp, km, xa, xa, stride_wn, stride_sn, KLIM, KIND, GS)
            acc_u = _gemv_tile(acc_u, wu, su, rows, rmask, gg, kp, km, xa, xa, stride_wn, stride_sn, KLIM, KIND, GS)
    gate = tl.sum(tl.sum(acc_g, axis=2), axis=1)
    up = tl.sum(tl.sum(acc_u, axis=2), axis=1)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + pid_p.to(tl.int64) * stride_hm + rows, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _moe_gemv_down_kernel(
    h_ptr, w_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr,
    N, KLIM, NGRP, TOPK,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    KIND: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
):
    """grid (M, cdiv(N, BN)): out[m, rows] = sum_k tw[m, k] * W_down[ids[m, k]][rows] @ h[m * TOPK + k]."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    acc = tl.zeros([BN, NG, GS], dtype=tl.float32)
    j = tl.arange(0, GS)
    for kk in range(0, TOPK):
        p = m * TOPK + kk
        e = tl.load(ids_ptr + p).to(tl.int64)
        wt = tl.load(tw_ptr + p).to(tl.float32)
        wb = w_ptr + e * stride_we
        if KIND == 1:
            sb = s_ptr + e * stride_se + ((pid_n * BN) // 128) * stride_sn
        else:
            sb = s_ptr + e * stride_se
        h_row = h_ptr + p.to(tl.int64) * stride_hm
        for g0 in range(0, NGRP, NG):
            gg = g0 + tl.arange(0, NG)
            kp = gg[:, None] * GS + j[None, :]
            km = kp < KLIM
            if KIND == 2:
                xa = tl.load(h_row + kp + gg[:, None] * GS, mask=km, other=0).to(tl.float32) * wt
                xb = tl.load(h_row + kp + gg[:, None] * GS + GS, mask=km, other=0).to(tl.float32) * wt
                acc = _gemv_tile(acc, wb, sb, rows, rmask, gg, kp, km, xa, xb, stride_wn, stride_sn, KLIM, KIND, GS)
            elif KIND == 1:
                xa = tl.load(h_row + kp, mask=km, other=0).to(tl.float32)
                xa = xa * (tl.load(sb + gg, mask=gg * GS < KLIM, other=0) * wt)[:, None]
                acc = _gemv_tile(acc, wb, sb, rows, rmask, gg, kp, km, xa, xa, stride_wn, stride_sn, KLIM, KIND, GS)
            else:
                xa = tl.load(h_row + kp, mask=km, other=0).to(tl.float32) * wt
                acc = _gemv_tile(acc, wb, sb, rows, rmask, gg, kp, km, xa, xa, stride_wn, stride_sn, KLIM, KIND, GS)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, out.to(out_ptr.dtype.element_ty), mask=rmask)


# int4 GEMV on tensor cores: the token's activations are row 0 of a 16-row tile (mma needs M >= 16; the other rows
# are masked zeros), the weight tile is dequantized to bf16 in registers and fed to tl.dot; the per-(row, group)
# scale multiplies the [16, BN] partial product, so each weight element costs ~2 integer ops instead of ~7 ops on
# the FMA path (measured by SASS instruction counts; see docs/perf-notes.md).

@triton.jit
def _moe_gemv_int4_dot_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr,
    N, K, TOPK,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    BN: tl.constexpr, G: tl.constexpr,
):
    """grid (P, cdiv(N, BN)); one quant group (G columns, G/2 bytes per row) per step; K % G == 0."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + pid_p).to(tl.int64)
    tok = (pid_p // TOPK).to(tl.int64)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    r16 = tl.arange(0, 16)
    j = tl.arange(0, G // 2)
    x_tile = x_ptr + tok * stride_xm + (r16 * 0)[:, None] + j[None, :]          # [16, G/2], row 0 is real
    xmask = (r16 == 0)[:, None]
    wg = w_ptr + e * stride_we + rows[:, None] * stride_wn + j[None, :]
    wu = wg + N * stride_wn
    sg = s_ptr + e * stride_se + rows * stride_sn
    su = sg + N * stride_sn
    acc_g = tl.zeros([16, BN], dtype=tl.float32)
    acc_u = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(0, K, G):
        g = k0 // G
        x_lo = tl.load(x_tile + k0, mask=xmask, other=0.0)
        x_hi = tl.load(x_tile + k0 + G // 2, mask=xmask, other=0.0)
        lo, hi = _int4_dq(tl.load(wg + k0 // 2, mask=rmask[:, None], other=0), x_lo.dtype)   # [BN, G/2]
        part = tl.dot(x_lo, tl.trans(lo)) + tl.dot(x_hi, tl.trans(hi))
        acc_g += part * tl.load(sg + g, mask=rmask, other=0).to(tl.float32)[None, :]
        lo, hi = _int4_dq(tl.load(wu + k0 // 2, mask=rmask[:, None], other=0), x_lo.dtype)
        part = tl.dot(x_lo, tl.trans(lo)) + tl.dot(x_hi, tl.trans(hi))
        acc_u += part * tl.load(su + g, mask=rmask, other=0).to(tl.float32)[None, :]
    gate = tl.sum(acc_g, axis=0)                    # rows 1..15 are exactly zero
    up = tl.sum(acc_u, axis=0)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + pid_p.to(tl.int64) * stride_hm + rows, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _moe_gemv_int4_dot_down_kernel(
    h_ptr, w_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr,
    N, K, TOPK,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    BN: tl.constexpr, G: tl.constexpr,
):
    """grid (M, cdiv(N, BN)): out[m, rows] = sum_k tw[m, k] * W_down[ids[m, k]][rows] @ h[m * TOPK + k]."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    r16 = tl.arange(0, 16)
    j = tl.arange(0, G // 2)
    xmask = (r16 == 0)[:, None]
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for kk in range(0, TOPK):
        p = m * TOPK + kk
        e = tl.load(ids_ptr + p).to(tl.int64)
        wt = tl.load(tw_ptr + p).to(tl.float32)
        h_tile = h_ptr + p.to(tl.int64) * stride_hm + (r16 * 0)[:, None] + j[None, :]
        wb = w_ptr + e * stride_we + rows[:, None] * stride_wn + j[None, :]
        sb = s_ptr + e * stride_se + rows * stride_sn
        for k0 in range(0, K, G):
            x_lo = tl.load(h_tile + k0, mask=xmask, other=0.0)
            x_hi = tl.load(h_tile + k0 + G // 2, mask=xmask, other=0.0)
            lo, hi = _int4_dq(tl.load(wb + k0 // 2, mask=rmask[:, None], other=0), x_lo.dtype)
            part = tl.dot(x_lo, tl.trans(lo)) + tl.dot(x_hi, tl.trans(hi))
            acc += part * (tl.load(sb + k0 // G, mask=rmask, other=0).to(tl.float32) * wt)[None, :]
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, out.to(out_ptr.dtype.element_ty), mask=rmask)


def _gemv_cfg(w: _KW, config: dict | None) -> dict:
    """-> dict(bn, ng, gs, warps) for kernel 1 (suffix 1) and kernel 2 (suffix 2) (+ the int4 dot variant's and
    the split mode's: split (None = auto), sbn1, sbn2, sw)."""
    cfg = dict(GEMV_DEFAULTS[w.kind], split=None, sbn1=4, sbn2=16, sw=4)
    if config:
        cfg.update({k: v for k, v in config.items() if k in cfg})
    for i in ("1", "2"):
        bn, rb = cfg["bn" + i], cfg["rb" + i]
        gs = {BF16: rb, FP8: 128, INT4: w.group // 2}[w.kind]
        if w.kind == FP8 and 128 % bn:
            raise ValueError(f"fp8 GEMV tiles need BN dividing 128, got {bn}")
        cfg["gs" + i], cfg["ng" + i] = gs, max(1, rb // gs)
    return cfg


def _full_k(w: _KW) -> tuple[int, int]:
    """(NG, GS) covering a whole row of w in one step (the latency-bound few-pairs case)."""
    if w.kind == BF16:
        return 1, triton.next_power_of_2(w.klim)
    gs = 128 if w.kind == FP8 else w.group // 2
    return triton.next_power_of_2(triton.cdiv(w.klim, gs)), gs


def _moe_gemv_split(x: Tensor, w13: _KW, w2: _KW, tw: Tensor, ids: Tensor, m: int, top_k: int, cfg: dict,
                    reduce: bool) -> Tensor:
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
        KIND=w13.kind, BN=cfg["sbn1"], NG=ng, GS=gs, num_warps=cfg["sw"])
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    ng, gs = _full_k(w2)
    _moe_gemv_down_kernel[(p, triton.cdiv(hidden, cfg["sbn2"]))](
        h, w2.data, w2.scale, ids, tw, y,
        hidden, w2.klim, triton.cdiv(w2.klim, gs), 1,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), y.stride(0),
        KIND=w2.kind, BN=cfg["sbn2"], NG=ng, GS=gs, num_warps=cfg["sw"])
    return y.view(m, top_k, hidden).sum(dim=1) if reduce else y.view(m, top_k, hidden)


def moe_gemv(x: Tensor, w13: _KW, w2: _KW, topk_weights: Tensor, topk_ids: Tensor,
             config: dict | None = None, reduce: bool = True) -> Tensor:
    """Decode path; x [M, H] -> [M, H] (or [M, k, H] unsummed when not reduce). See the module docstring."""
    m, top_k = topk_ids.shape
    p, inter, hidden = m * top_k, w2.k, w2.n
    cfg = _gemv_cfg(w13, config)
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    split = cfg["split"] if cfg["split"] is not None else p <= SPLIT_MAX_PAIRS
    if split:
        return _moe_gemv_split(x, w13, w2, tw, ids, m, top_k, cfg, reduce)
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    if w13.kind == INT4 and cfg["int4_dot"]:
        _moe_gemv_int4_dot_gate_up_kernel[(p, triton.cdiv(inter, cfg["dbn1"]))](
            x, w13.data, w13.scale, ids, h, inter, w13.k, top_k,
            x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1),
            h.stride(0), BN=cfg["dbn1"], G=w13.group, num_warps=cfg["dw1"], num_stages=cfg["dst"])
        out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
        _moe_gemv_int4_dot_down_kernel[(m, triton.cdiv(hidden, cfg["dbn2"]))](
            h, w2.data, w2.scale, ids, tw, out, hidden, w2.k, top_k,
            h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1),
            out.stride(0), BN=cfg["dbn2"], G=w2.group, num_warps=cfg["dw2"], num_stages=cfg["dst"])
        return out
    _moe_gemv_gate_up_kernel[(p, triton.cdiv(inter, cfg["bn1"]))](
        x, w13.data, w13.scale, ids, h,
        inter, w13.klim, triton.cdiv(w13.klim, cfg["gs1"]), top_k,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        KIND=w13.kind, BN=cfg["bn1"], NG=cfg["ng1"], GS=cfg["gs1"], num_warps=cfg["w1"])
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    _moe_gemv_down_kernel[(m, triton.cdiv(hidden, cfg["bn2"]))](
        h, w2.data, w2.scale, ids, tw, out,
        hidden, w2.klim, triton.cdiv(w2.klim, cfg["gs2"]), top_k,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), out.stride(0),
        KIND=w2.kind, BN=cfg["bn2"], NG=cfg["ng2"], GS=cfg["gs2"], num_warps=cfg["w2"])
    return out


# ---- sorted (grouped GEMM) path ----------------------------------------------------------------------------------

def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Group (token, expert) pairs by expert, each expert's run padded to a multiple of block_m. Torch ops only,
    no host sync, static output sizes (so it can sit in a CUDA graph).

    topk_ids [M, k] -> sorted_pairs [NB * block_m] int32 (pair index p = token * k + slot; padding = P),
                       block_expert [NB] int32 (expert of each block; num_experts past the last used block),
    with NB = cdiv(P, block_m) + min(E, P), an upper bound on the padded block count.
    """
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    nb = triton.cdiv(p, block_m) + min(num_experts, p)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)                      # pairs grouped by expert
    sorted_e = flat[order]
    rank = torch.arange(p, device=flat.device) - (counts.cumsum(0) - counts)[sorted_e]
    sorted_pairs = torch.full((nb * block_m,), p, dtype=torch.int32, device=flat.device)
    sorted_pairs[starts[sorted_e] + rank] = order.to(torch.int32)
    block_start = torch.arange(nb, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _moe_dot_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, sorted_ptr, block_e_ptr, tw_ptr,
    N, K, P, TOPK, E,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    KIND: tl.constexpr, GATE_UP: tl.constexpr, A_SORTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """grid (NB, cdiv(N, BN)); block pid_m holds BM pairs of expert e = block_e[pid_m].
    GATE_UP: a = x gathered by token (pair // TOPK), out = h [NB*BM, N] in sorted order, h = silu(gate) * up with
             gate rows [0, N) and up rows [N, 2N) of w13.
    else:    a = h in sorted order (A_SORTED), out = y [P, N] by pair, scaled by the router weight tw[pair]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_e_ptr + pid_m)
    if e >= E:
        return
    e = e.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    mvalid = pair < P
    if A_SORTED:
        arow = offs_m.to(tl.int64)
    else:
        arow = (pair // TOPK).to(tl.int64)
    rows = pid_n * BN + tl.arange(0, BN)
    nmask = rows < N
    wb = w_ptr + e * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    a_rows = a_ptr + arow[:, None] * stride_am
    if KIND == 2:
        jj = tl.arange(0, BK // 2)
        for k0 in range(0, K, BK):              # BK == group, K % BK == 0; half-split packing
            a_e = tl.load(a_rows + (k0 + jj)[None, :], mask=mvalid[:, None], other=0.0)
            a_o = tl.load(a_rows + (k0 + BK // 2 + jj)[None, :], mask=mvalid[:, None], other=0.0)
            pk = k0 // 2 + jj
            p = tl.load(wb + rows[None, :] * stride_wn + pk[:, None], mask=nmask[None, :], other=0)
            lo, hi = _int4_dq(p, a_e.dtype)
            sc = tl.load(s_ptr + e * stride_se + rows * stride_sn + k0 // BK, mask=nmask, other=0).to(tl.float32)
            acc += (tl.dot(a_e, lo) + tl.dot(a_o, hi)) * sc[None, :]
            if GATE_UP:
                p2 = tl.load(wb + (rows + N)[None, :] * stride_wn + pk[:, None], mask=nmask[None, :], other=0)
                lo2, hi2 = _int4_dq(p2, a_e.dtype)
                sc2 = tl.load(s_ptr + e * stride_se + (rows + N) * stride_sn + k0 // BK,
                              mask=nmask, other=0).to(tl.float32)
                acc2 += (tl.dot(a_e, lo2) + tl.dot(a_o, hi2)) * sc2[None, :]
    else:
        kk = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            ka = k0 + kk
            kmask = ka < K
            a = tl.load(a_rows + ka[None, :], mask=mvalid[:, None] & kmask[None, :], other=0.0)
            w = tl.load(wb + rows[None, :] * stride_wn + ka[:, None], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            if KIND == 1:                        # BK == 128, BN divides 128, N % 128 == 0
                s = tl.load(s_ptr + e * stride_se + ((pid_n * BN) // 128) * stride_sn + k0 // 128)
                acc += tl.dot(a, w.to(a.dtype)) * s
            else:
                acc = tl.dot(a, w, acc)
            if GATE_UP:
                w2 = tl.load(wb + (rows + N)[None, :] * stride_wn + ka[:, None],
                             mask=kmask[:, None] & nmask[None, :], other=0.0)
                if KIND == 1:
                    s2 = tl.load(s_ptr + e * stride_se + ((N + pid_n * BN) // 128) * stride_sn + k0 // 128)
                    acc2 += tl.dot(a, w2.to(a.dtype)) * s2
                else:
                    acc2 = tl.dot(a, w2, acc2)
    if GATE_UP:
        h = acc * tl.sigmoid(acc) * acc2
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + rows[None, :],
                 h.to(out_ptr.dtype.element_ty), mask=nmask[None, :])
    else:
        tw = tl.load(tw_ptr + pair, mask=mvalid, other=0.0).to(tl.float32)
        y = acc * tw[:, None]
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + rows[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mvalid[:, None] & nmask[None, :])


def _pick_bm(pairs: int, experts: int) -> int:
    per_expert = pairs / max(1, experts)
    return 16 if per_expert < 24 else 32 if per_expert < 64 else 64


def _sorted_cfg(w: _KW, config: dict | None) -> dict:
    cfg = dict(SORTED_DEFAULTS[w.kind])
    if config:
        cfg.update({k: v for k, v in config.items() if k in cfg or k == "bm"})
    if w.kind == INT4:
        cfg["bk"] = w.group
    if w.kind == FP8 and (cfg["bk"] != 128 or 128 % cfg["bn"] or 128 % cfg["bn2"]):
        raise ValueError("fp8 sorted tiles need BK == 128 and BN dividing 128")
    return cfg


def moe_sorted(x: Tensor, w13: _KW, w2: _KW, topk_weights: Tensor, topk_ids: Tensor,
               config: dict | None = None, reduce: bool = True) -> Tensor:
    """Prefill path; x [M, H] -> [M, H] (or [M, k, H] unsummed when not reduce). See the module docstring."""
    m, top_k = topk_ids.shape
    p, inter, hidden, experts = m * top_k, w2.k, w2.n, w13.data.shape[0]
    cfg = _sorted_cfg(w13, config)
    bm = cfg.get("bm") or _pick_bm(p, experts)
    sorted_pairs, block_expert = moe_align(topk_ids, experts, bm)
    nb = block_expert.shape[0]
    tw = topk_weights.reshape(-1).contiguous()
    h = torch.empty(nb * bm, inter, dtype=x.dtype, device=x.device)
    _moe_dot_kernel[(nb, triton.cdiv(inter, cfg["bn"]))](
        x, w13.data, w13.scale, h, sorted_pairs, block_expert, tw,
        inter, w13.k, p, top_k, experts,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        KIND=w13.kind, GATE_UP=True, A_SORTED=False, BM=bm, BN=cfg["bn"], BK=cfg["bk"],
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    _moe_dot_kernel[(nb, triton.cdiv(hidden, cfg["bn2"]))](
        h, w2.data, w2.scale, y, sorted_pairs, block_expert, tw,
        hidden, w2.k, p, top_k, experts,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), y.stride(0),
        KIND=w2.kind, GATE_UP=False, A_SORTED=True, BM=bm, BN=cfg["bn2"], BK=cfg["bk"],
        num_warps=cfg["warps2"], num_stages=cfg["stages2"])
    return y.view(m, top_k, hidden).sum(dim=1) if reduce else y.view(m, top_k, hidden)


# ---- entry point -------------------------------------------------------------------------------------------------

def fused_moe(x: Tensor, w13: QuantWeight, w2: QuantWeight, topk_weights: Tensor, topk_ids: Tensor, *,
              path: str = "auto", config: dict | None = None, reduce: bool = True) -> Tensor:
    """Routed experts. x [M, H] bf16/fp16; w13 [E, 2I, H], w2 [E, H, I] (bf16 | Fp8BlockWeight | Int4GroupWeight,
    both the same format); topk_weights [M, k] float32; topk_ids [M, k] int -> [M, H] in x.dtype. With
    reduce=False the paths that end in a sum over the k experts return [M, k, H] instead (the caller's
    sigmoid_gate_add sums them in its pass), others still [M, H].
    path: "auto" (GEMV up to GEMV_MAX_PAIRS[kind] pairs, else sorted), "gemv" or "sorted"."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused_moe takes bf16/fp16 activations, got {x.dtype}")
    a, b = _kernel_view(w13), _kernel_view(w2)
    if a.kind != b.kind or a.n != 2 * b.k or a.k != b.n or a.k != x.shape[1]:
        raise ValueError(f"MoE weight shapes/formats disagree: w13 {a.n}x{a.k} ({a.kind}), w2 {b.n}x{b.k} ({b.kind}),"
                         f" x {tuple(x.shape)}")
    if a.kind == BF16 and a.data.dtype != x.dtype:
        x = x.to(a.data.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if topk_ids.numel() == 0:
        return torch.zeros_like(x)
    if path == "auto":
        path = "gemv" if topk_ids.numel() <= GEMV_MAX_PAIRS[a.kind] else "sorted"
    if path == "gemv":
        return moe_gemv(x, a, b, topk_weights, topk_ids, config, reduce)
    if path == "sorted":
        return moe_sorted(x, a, b, topk_weights, topk_ids, config, reduce)
    raise ValueError(f"unknown MoE path {path!r} (auto, gemv, sorted)")


def weight_bytes_touched(w13: QuantWeight, w2: QuantWeight, topk_ids: Tensor) -> int:
    """Bytes of expert weights (with scales) the routed tokens need: the HBM floor of one MoE call."""
    experts = int(torch.unique(topk_ids).numel())
    total = sum(_nbytes(w) for w in (w13, w2))
    return total * experts // _num_experts(w13)


def _nbytes(w: QuantWeight) -> int:
    return w.nbytes if isinstance(w, (Fp8BlockWeight, Int4GroupWeight)) else w.numel() * w.element_size()


def _num_experts(w: QuantWeight) -> int:
    return (w.w if isinstance(w, Fp8BlockWeight) else w.qweight if isinstance(w, Int4GroupWeight) else w).shape[0]
