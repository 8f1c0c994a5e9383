"""FP8 block-scaled dense linear (the checkpoint's format) for the non-expert projections: y = x @ W_real^T.

W: Fp8BlockWeight, w [N, K] e4m3 + scale_inv [ceil(N/128), ceil(K/128)] float32 (N, K multiples of 128 here, as in
every Qwen3-Next projection that the FP8 checkpoint quantizes). x [..., K] bf16/fp16 -> y [..., N] in x.dtype.

Paths (fp8_linear(path="auto") picks by the number of rows M):
* "gemv"  (M <= GEMV_MAX_M, decode): W8A16; one program per (row, BN outputs) streams [BN, NG x 128] weight tiles,
           converts them in registers, sums each step's products per scale group and scales the sums into a
           float32 [BN, NG] accumulator. Memory bound: goal = weight bytes / HBM bandwidth. The same program
           code also forms a SwiGLU input on the way in and runs two GEMVs of one x as one grid (gemv_pair);
           qnext.ops.triton_fused_linear uses both.
* "w8a8"  (prefill): activations quantized per (row, 128 columns) to e4m3 with a float32 scale (1 small kernel),
           then an fp8 x fp8 tl.dot (Hopper fp8 tensor cores) whose per-128-K partial products get
           a_scale[row] * w_scale[block] — the DeepSeek-style 1x128 / 128x128 scheme.
* "w8a16" tl.dot in bf16 with the weight tile converted in registers. auto takes it for decode batches
           (GEMV_MAX_M < M <= SMALL_M_MAX) with small tiles (small_m_tiles: BM = M rounded up to a power of two, so
           each weight tile is read once, narrow BN and split-K, so even N = 2048 gives enough programs): there it
           moves half the bytes of bf16 cuBLAS, while scaled_mm pays an activation-quantization launch and tiles
           made for large M (H100, 32 rows: the FP8-dense decode step took 16.3 ms against 9.9 with bf16 dense
           weights).
* "dequant" (auto above SMALL_M_MAX rows, prefill): one Triton pass writes W as x.dtype (float32(w) * scale,
           rounded: the torch reference's dequantization bit for bit), then cuBLAS. At prefill sizes the GEMM is
           compute bound and the pass costs ~3 bytes per weight, while the fp8 paths pay an
           activation-quantization pass and round the activations (see LARGE_M_PATH for the measured trade).
* "scaled_mm" torch.nn.functional.scaled_mm with BlockWise1x128 / BlockWise128x128 scales when this torch build
           supports it (torch 2.11 on Hopper does); "w8a8" our fp8 x fp8 kernel, the same rounding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.quant import FP8_DTYPE, Fp8BlockWeight
from qnext.ops.triton_ffn import _route_row
from qnext.ops.triton_moe_weights import fp8_to

Tensor = torch.Tensor

GEMV_MAX_M = 4
SMALL_M_MAX = 64
# auto's path above SMALL_M_MAX rows. H200 (scripts/gpu_check.py --only fp8prefill, docs/perf-notes.md): dequant +
# cuBLAS beats scaled_mm at every size from 256 rows for N <= 2048 (out_proj, 8K rows: 240 vs 318 us) and ties it up
# to 2K rows on the wide shapes; at 8K rows scaled_mm is ~20% faster there (12288 x 2048: 465 vs 588 us), but its
# fp8 activations err ten times more (relative 2.6e-2 against 2.4e-3).
LARGE_M_PATH = "dequant"
# Plain weights up to this many outputs take bf16_gemv for decode rows (router + shared-expert gate 513 x 2048:
# 2.3 us against cuBLAS's 3.0; in_proj_ba 64 x 2048: 1.9 against 4.9, H200); wider ones (lm_head) cuBLAS, which
# streams them at the copy rate.
BF16_GEMV_MAX_N = 4096
# bf16_gemv's default (BN, NG, warps): the H200 sweep's best for 513 and 64 outputs (scripts/gpu_check.py --only
# fp8gemv).
BF16_GEMV_TILE = (2, 16, 4)
# small_m_tiles splits K (by at most MAX_SPLIT; QNEXT_FP8_MAX_SPLIT=1 turns split-K off for A/B runs) until a call
# has about SPLIT_PROGRAMS programs (2 per SM of an H100 / H200), leaving each program at least SPLIT_MIN_STEPS
# 128-column steps. H200 sweep (gpu_check --only fp8small): at 32 rows 2048 x 4096 14.8 -> 12.0 us (split 4),
# 12288 x 2048 17.4 -> 16.2 (split 2), 1024 x 2048 7.8 -> 6.1 (split 4); shorter programs lost (2048 x 512: 3.6 us
# unsplit, 5.1 at 2 steps per program, 5.6 at 1; 12288 x 2048 at 8 rows: 12.5 unsplit, 16.2 split 2).
SPLIT_PROGRAMS = 264
# The GEMV loads its first weight tile before the PDL wait (_fp8_gemv_kernel's EARLY); False for A/B runs.
GEMV_EARLY_LOAD = True
SPLIT_MIN_STEPS = 4
# The GEMV sums each step's products per scale group into a [BN, NG] accumulator (_gemv_step); False keeps the
# [BN, NG, 128] products to the end (the previous kernel, for A/B runs).
GEMV_STEP_SUM = True
MAX_SPLIT = int(os.environ.get("QNEXT_FP8_MAX_SPLIT", "8"))
# Decode batches' w8a16 tiles with the weights as the MMA's first operand (small_m_tiles' swap): "auto" swaps the
# narrow, long-K shapes only (N < 4096, K >= 4096: out_proj and o_proj, 2048 x 4096). H100 (gpu_check.py --only
# fp8small, 2026-12-05): 2048 x 4096 at 32 / 8 rows 10.8 / 10.1 us swapped (128 programs of 64 rows, split 4)
# against 12.6 / 11.6 for the best unswapped tiles; 12288 x 2048 18.1 against 17.5, 1024 x 2048 9.1 against 6.1,
# 2048 x 512 4.6 against 3.4. Why it can win (offline SASS, scripts/offline_sass.py fp8small): the unswapped loop
# spends ~110 of ~400 instructions per step moving activation fragments into the operand registers (their k order,
# set by the fp8 operand, differs from the MMA's); swapped, the conversion writes the operand registers.
SMALL_M_SWAP = "auto"
# Swapped programs keep at least this many 128-column steps: with 4 (as many as the pipeline's stages) Triton
# 3.9 does not pipeline the loop (plain loads and shared stores instead of cp.async, 445 against 342
# instructions per step on 2048 x 4096).
SWAP_MIN_STEPS = 8


@triton.jit
def _gemv_weight_tile(w_rows, s_row, gg, j, rmask, groups, SCALED: tl.constexpr):
    """The weight tile [BN, NG, 128] of scale groups gg [NG] as stored (masked from `groups` on) and its block
    scales [NG] (zeros when not SCALED)."""
    gm = gg < groups
    w = tl.load(w_rows + (gg[:, None] * 128 + j[None, :])[None, :, :], mask=rmask[:, None, None] & gm[None, :, None],
                other=0.0)
    if SCALED:
        sc = tl.load(s_row + gg, mask=gm, other=0)
    else:
        sc = tl.zeros_like(gg).to(tl.float32)
    return w, sc


@triton.jit
def _gemv_x(x_row, gg, j, groups, up_off, SWIGLU: tl.constexpr):
    """The activations of x's scale groups gg [NG] as float32 [NG, 128]: as stored, or (SWIGLU) silu(x) * up of a
    stacked gate | up row, up at x_row + up_off, rounded to x's dtype as qnext.ops.triton_ffn.silu_mul stores it
    (the input formed here instead of by a kernel of its own)."""
    gm = (gg < groups)[:, None]
    offs = gg[:, None] * 128 + j[None, :]
    x = tl.load(x_row + offs, mask=gm, other=0).to(tl.float32)
    if SWIGLU:
        up = tl.load(x_row + up_off + offs, mask=gm, other=0).to(tl.float32)
        x = (x * tl.sigmoid(x) * up).to(x_row.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _head_rstd(ss_row, gg, groups, eps, P: tl.constexpr):
    """rsqrt(mean square + eps) [NG] of x's heads gg (one per 128-column scale group), each head's sum of squares
    the sum of its P partial sums at ss_row + g * P."""
    ss = tl.load(ss_row + gg[:, None] * P + tl.arange(0, P)[None, :], mask=(gg < groups)[:, None], other=0)
    return tl.rsqrt(tl.sum(ss, axis=1) / 128 + eps)


@triton.jit
def _gemv_step(w, sc, xs, SCALED: tl.constexpr, STEP_SUM: tl.constexpr, rs=0.0, HEAD_RSTD: tl.constexpr = False):
    """One step's partial dots of the weight tile w [BN, NG, 128] with x's groups xs [NG, 128]: [BN, NG] float32
    (each group's 128 products summed now, then scaled) when STEP_SUM, else the products [BN, NG, 128] (x
    pre-scaled), summed by the caller at the end (128 times the accumulator registers). HEAD_RSTD: scaled by rs
    [NG] too (see _fp8_gemv_kernel)."""
    if STEP_SUM:
        part = tl.sum(w.to(tl.float32) * xs[None, :, :], axis=2)
        if SCALED:
            part = part * sc[None, :]
        if HEAD_RSTD:
            part = part * rs[None, :]
    else:
        if SCALED:
            xs = xs * sc[:, None]
        if HEAD_RSTD:
            xs = xs * rs[:, None]
        part = w.to(tl.float32) * xs[None, :, :]
    return part


@triton.jit
def _gemv_program(x_ptr, w_ptr, s_ptr, y_ptr, m, pid_n, N, K, stride_xm, stride_wn, stride_sn, stride_ym, up_off,
                  BN: tl.constexpr, NG: tl.constexpr, SCALED: tl.constexpr, EARLY: tl.constexpr,
                  STEP_SUM: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr, ss_row=0, eps=0.0,
                  P: tl.constexpr = 1, HEAD_RSTD: tl.constexpr = False):
    """Row m's outputs [pid_n * BN, + BN) (see _fp8_gemv_kernel), stored and returned [BN] in y's dtype. HEAD_RSTD:
    row m's partial sums of squares at ss_row, P per head (_head_rstd)."""
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    j = tl.arange(0, 128)
    s_row = s_ptr + ((pid_n * BN) // 128) * stride_sn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w_rows = w_ptr + rows[:, None, None] * stride_wn
    groups = K // 128
    gg0 = tl.arange(0, NG)
    if EARLY:
        w0, s0 = _gemv_weight_tile(w_rows, s_row, gg0, j, rmask, groups, SCALED)
        pdl_wait_then_release(PDL)
    else:
        pdl_wait_then_release(PDL)
        w0, s0 = _gemv_weight_tile(w_rows, s_row, gg0, j, rmask, groups, SCALED)
    xs = _gemv_x(x_row, gg0, j, groups, up_off, SWIGLU)
    rs = _head_rstd(ss_row, gg0, groups, eps, P) if HEAD_RSTD else 0.0
    acc = _gemv_step(w0, s0, xs, SCALED, STEP_SUM, rs, HEAD_RSTD)
    for g0 in range(NG, groups, NG):
        gg = g0 + tl.arange(0, NG)
        w, sc = _gemv_weight_tile(w_rows, s_row, gg, j, rmask, groups, SCALED)
        xs = _gemv_x(x_row, gg, j, groups, up_off, SWIGLU)
        rs = _head_rstd(ss_row, gg, groups, eps, P) if HEAD_RSTD else 0.0
        acc += _gemv_step(w, sc, xs, SCALED, STEP_SUM, rs, HEAD_RSTD)
    if STEP_SUM:
        y = tl.sum(acc, axis=1)
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + rows, y, mask=rmask)
    return y


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym, up_off,
                     ss_ptr, stride_ssm, eps,
                     BN: tl.constexpr, NG: tl.constexpr, SCALED: tl.constexpr = True, EARLY: tl.constexpr = True,
                     STEP_SUM: tl.constexpr = True, SWIGLU: tl.constexpr = False, P: tl.constexpr = 1,
                     HEAD_RSTD: tl.constexpr = False, PDL: tl.constexpr = False):
    """grid (M, cdiv(N, BN)); BN divides 128 so the tile's rows share one scale row. SCALED=False: a plain 16-bit
    weight (bf16_gemv; s_ptr unused). SWIGLU: the input is silu(x) * x[up_off:] (_gemv_x). HEAD_RSTD: the input is
    x with each 128-column head scaled by rsqrt(mean square + eps), the head's sum of squares given as P partial
    sums at ss [M, K / 128, P] (rows stride_ssm apart): the GDN output norm finished in the projection, applied to
    each group's sum of products (an RMSNorm's scale is one per head, so it commutes with the dot).
    EARLY: the first step's weight tile and scales are loaded before the PDL wait. Weights are never written during
    a step, so that load may overlap the previous kernel's tail (x and y only after the wait).
    Measured slower for every shape and tile (H200, docs/perf-notes.md): loading every next step's tile before the
    current step's math (Triton pipelines only loads that feed a tl.dot), and split-K (the ticket fix-up's two
    dependent round trips cost more than the shorter K loop saves)."""
    m = tl.program_id(0)
    _gemv_program(x_ptr, w_ptr, s_ptr, y_ptr, m, tl.program_id(1), N, K, stride_xm, stride_wn, stride_sn,
                  stride_ym, up_off, BN, NG, SCALED, EARLY, STEP_SUM, SWIGLU, PDL, ss_ptr + m.to(tl.int64) * stride_ssm,
                  eps, P, HEAD_RSTD)


@triton.jit
def _gemv_pair_kernel(x_ptr, K, stride_xm,
                      w1_ptr, s1_ptr, y1_ptr, N1, stride_w1, stride_s1, stride_y1,
                      w2_ptr, s2_ptr, y2_ptr, N2, stride_w2, stride_s2, stride_y2,
                      BN1: tl.constexpr, NG1: tl.constexpr, SCALED1: tl.constexpr,
                      BN2: tl.constexpr, NG2: tl.constexpr, SCALED2: tl.constexpr,
                      EARLY: tl.constexpr = True, STEP_SUM: tl.constexpr = True, PDL: tl.constexpr = False):
    """Two GEMVs of one x in one launch: grid (M, cdiv(N1, BN1) + cdiv(N2, BN2)); the first programs compute
    y1 = x @ W1^T, the rest y2 = x @ W2^T, each with its own tile and format (see _fp8_gemv_kernel)."""
    m = tl.program_id(0)
    p = tl.program_id(1)
    tiles1 = tl.cdiv(N1, BN1)
    if p < tiles1:
        _gemv_program(x_ptr, w1_ptr, s1_ptr, y1_ptr, m, p, N1, K, stride_xm, stride_w1, stride_s1, stride_y1, 0,
                      BN1, NG1, SCALED1, EARLY, STEP_SUM, False, PDL)
    else:
        _gemv_program(x_ptr, w2_ptr, s2_ptr, y2_ptr, m, p - tiles1, N2, K, stride_xm, stride_w2, stride_s2,
                      stride_y2, 0, BN2, NG2, SCALED2, EARLY, STEP_SUM, False, PDL)


@triton.jit
def _swiglu_gemv_route_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym, up_off,
                              logits_ptr, ids_ptr, tw_ptr, E, stride_lt,
                              BN: tl.constexpr, NG: tl.constexpr, SCALED: tl.constexpr, TOPK: tl.constexpr,
                              BE: tl.constexpr, BK: tl.constexpr, RENORM: tl.constexpr, EARLY: tl.constexpr = True,
                              STEP_SUM: tl.constexpr = True, PDL: tl.constexpr = False):
    """The MoE block's two consumers of the router GEMV pair in one launch: grid (M, cdiv(N, BN) + 1); the first
    programs of row m compute the shared expert's down projection of silu(x) * x[up_off:] (_fp8_gemv_kernel with
    SWIGLU), the last one routes token m (qnext.ops.triton_ffn's _route_row over logits [M, E])."""
    m = tl.program_id(0)
    p = tl.program_id(1)
    if p < tl.cdiv(N, BN):
        _gemv_program(x_ptr, w_ptr, s_ptr, y_ptr, m, p, N, K, stride_xm, stride_wn, stride_sn, stride_ym, up_off,
                      BN, NG, SCALED, EARLY, STEP_SUM, True, PDL)
    else:
        pdl_wait_then_release(PDL)
        _route_row(logits_ptr, ids_ptr, tw_ptr, m, E, stride_lt, TOPK, BE, BK, RENORM)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm):
    """grid (M, K / 128): per (row, 128 columns) scale = amax / 448, q = x / scale in e4m3."""
    m = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    j = kb * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + m * stride_xm + j).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    tl.store(q_ptr + m * stride_qm + j, tl.clamp(x / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + m * stride_sm + kb, scale)


@triton.jit
def _fp8_dot_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K,
                    stride_am, stride_asm, stride_wn, stride_wsn, stride_ym,
                    W8A8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
                    SPLIT: tl.constexpr, SWAP: tl.constexpr = False, PDL: tl.constexpr = False):
    """grid (cdiv(M, BM) * cdiv(N, BN), SPLIT); BK = 128 = the scale block; BN divides 128; K / 128 % SPLIT == 0.
    W8A8: a is e4m3 with per-(row, 128) scales as_ptr [M, K/128]; else a is bf16/fp16 (as_ptr unused).
    SPLIT > 1 (split-K, for few rows: the weight tiles of one output block are streamed by SPLIT programs instead
    of one long chain): each program stores its float32 partial tile to part [tiles, SPLIT, BM, BN] and takes a
    ticket from the tile's counter (cnt, int32, zero between calls); the last one adds the SPLIT partials in split
    order (the result does not depend on which program finishes last), writes y and puts the counter back to 0.
    SWAP (w8a16 only): the converted weight tile is the MMA's first operand, acc^T [BN, BM] = W x a^T, so the
    conversion writes the operand registers themselves and the activations are the second operand."""
    pdl_wait_then_release(PDL)
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n                    # grouped order: GROUP_M row blocks share each weight tile in L2
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    kk = tl.arange(0, 128)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    ws_row = ws_ptr + ((pid_n * BN) // 128) * stride_wsn
    ks = K // SPLIT
    if SWAP:                                    # everything [BN, BM]: output column n, row m
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        for k0 in range(pid_s * ks, pid_s * ks + ks, 128):
            a = tl.load(a_rows + (k0 + kk)[None, :], mask=mmask[:, None], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + kk)[None, :], mask=nmask[:, None], other=0.0)
            acc += tl.dot(fp8_to(w, a.dtype), tl.trans(a)) * tl.load(ws_row + k0 // 128)
        y_tile = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        ymask = mmask[None, :] & nmask[:, None]
        cell = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(pid_s * ks, pid_s * ks + ks, 128):
            a = tl.load(a_rows + (k0 + kk)[None, :], mask=mmask[:, None], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + kk)[:, None], mask=nmask[None, :], other=0.0)
            ws = tl.load(ws_row + k0 // 128)
            if W8A8:
                a_s = tl.load(as_ptr + rm * stride_asm + k0 // 128, mask=mmask, other=0.0)
                acc += tl.dot(a, w) * (a_s[:, None] * ws)
            else:
                acc += tl.dot(a, fp8_to(w, a.dtype)) * ws
        y_tile = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        ymask = mmask[:, None] & nmask[None, :]
        cell = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    if SPLIT == 1:
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tile_part = part_ptr + pid.to(tl.int64) * (SPLIT * BM * BN)
        tl.store(tile_part + pid_s * BM * BN + cell, acc)
        tl.debug_barrier()                          # every thread's partial is written before the ticket
        if tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                acc += tl.load(tile_part + s * BM * BN + cell, volatile=True)
            tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(cnt_ptr + pid, 0)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_yn, BN: tl.constexpr):
    """grid (cdiv(N, BN), K / 128); BN divides 128: y[rows, block] = (float32(w) * scale of the block) in y's dtype."""
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    cols = kb * 128 + tl.arange(0, 128)
    mask = (rows < N)[:, None]
    scale = tl.load(s_ptr + ((pid_n * BN) // 128) * stride_sn + kb)
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :],
             (w.to(tl.float32) * scale).to(y_ptr.dtype.element_ty), mask=mask)


def dequantize_fp8(w: Fp8BlockWeight, dtype: torch.dtype) -> Tensor:
    """W [N, K] in dtype, equal to qnext.ops.quant.dequantize_fp8_block(w, dtype)."""
    n, k = _check(w)
    y = torch.empty(n, k, dtype=dtype, device=w.w.device)
    s = w.scale_inv.float().contiguous()
    _dequant_kernel[(triton.cdiv(n, 32), k // 128)](w.w, s, y, n, k, w.w.stride(0), s.stride(0), y.stride(0),
                                                     BN=32, num_warps=4)
    return y


def quantize_act_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] (K % 128 == 0) -> (e4m3 [M, K], scales [M, K/128] float32): per (row, 128 columns) amax / 448."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, k // 128, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, k // 128)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), num_warps=1)
    return q, s


def _check(w: Fp8BlockWeight) -> tuple[int, int]:
    n, k = w.w.shape
    if w.block != 128 or n % 128 or k % 128:
        raise ValueError(f"fp8 linear kernels need 128x128 blocks and N, K multiples of 128, got {n}x{k}")
    return n, k


def gemv_tiles(n: int, k: int) -> tuple[int, int, int]:
    """(BN rows, NG scale groups per step, warps) for an N x K weight at M = 1, from scripts/gpu_check.py's sweeps
    (H200, early weight load, PDL, docs/perf-notes.md). With the [BN, NG] accumulator (2026-12-03, two runs):
    wide outputs bn16 ng8 (12288 x 2048 8.7 / 7.8 us against the old accumulator and tile 10.0 / 9.8; 9216 x 2048 7.0
    against 9.9; 32 rows or 8 warps lost there); narrow outputs small row tiles and long steps (2048 x 4096 bn4
    ng16 4.1 us, 1024 x 2048 1.8, both as before). GEMV_STEP_SUM False: the old accumulator's tiles."""
    if n <= 2048:
        return 4, 16, 4
    if not GEMV_STEP_SUM:
        return 16, 2 if n >= 12288 else 4, 4
    return 16, 8, 4


def _ng(ng: int, k: int) -> int:
    return min(ng, 1 << ((k // 128).bit_length() - 1))          # a power of two (tl.arange) within K's groups


def _gemv(x: Tensor, w: Tensor, scale: Tensor | None, n: int, k: int, bn: int, ng: int, num_warps: int,
          up: Tensor | None = None, head_rstd: tuple[Tensor, float] | None = None) -> Tensor:
    """Launch _fp8_gemv_kernel: x [M, K] against w [N, K] (e4m3 with block scales, or 16-bit when scale is None).
    up [M, K] (x's row stride, the other half of one stacked gate | up row): the input is silu(x) * up.
    head_rstd (partial sums of squares [M, K / 128, P] contiguous, eps): x's heads scaled by their rsqrt(mean
    square + eps) (HEAD_RSTD)."""
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    up_off = 0 if up is None else (up.data_ptr() - x.data_ptr()) // x.element_size()
    ss, eps = head_rstd if head_rstd is not None else (x.view(m, -1, 1), 0.0)        # P = 1 when unused
    _fp8_gemv_kernel[(m, triton.cdiv(n, bn))](
        x, w, w if scale is None else scale, y, n, k, x.stride(0), w.stride(0),
        0 if scale is None else scale.stride(0), y.stride(0), up_off, ss, ss.stride(0), eps, BN=bn, NG=_ng(ng, k),
        SCALED=scale is not None, EARLY=GEMV_EARLY_LOAD, STEP_SUM=GEMV_STEP_SUM, SWIGLU=up is not None,
        P=ss.shape[2], HEAD_RSTD=head_rstd is not None, num_warps=num_warps, **pdl_launch())
    return y


def _operand(w: Fp8BlockWeight | Tensor) -> tuple[Tensor, Tensor | None, int, int, tuple[int, int, int]]:
    """(weight, float32 scales or None, N, K, default (BN, NG, warps)) of one GEMV weight, fp8 or 16-bit."""
    if isinstance(w, Fp8BlockWeight):
        n, k = _check(w)
        return w.w, w.scale_inv.float().contiguous(), n, k, gemv_tiles(n, k)
    n, k = w.shape
    if k % 128:
        raise ValueError(f"bf16_gemv needs K % 128 == 0, got {k}")
    return w, None, n, k, BF16_GEMV_TILE


def fp8_gemv(x: Tensor, w: Fp8BlockWeight, bn: int | None = None, ng: int | None = None,
             num_warps: int | None = None, up: Tensor | None = None,
             head_rstd: tuple[Tensor, float] | None = None) -> Tensor:
    """x [M, K] (a few rows) @ W^T (up: of silu(x) * up; head_rstd: of x's heads normalised; see _gemv); tiles
    default to gemv_tiles."""
    wt, scale, n, k, tiles = _operand(w)
    return _gemv(x, wt, scale, n, k, bn or tiles[0], ng or tiles[1], num_warps or tiles[2], up, head_rstd)


def bf16_gemv(x: Tensor, w: Tensor, bn: int = BF16_GEMV_TILE[0], ng: int = BF16_GEMV_TILE[1],
              num_warps: int = BF16_GEMV_TILE[2], up: Tensor | None = None,
              head_rstd: tuple[Tensor, float] | None = None) -> Tensor:
    """x [M, K] @ w [N, K]^T for a few rows and a 16-bit weight (K % 128 == 0, N <= 65535 * bn: the grid's second
    dimension), through the fp8 GEMV kernel without scales. up: of silu(x) * up; head_rstd: of x's heads
    normalised (see _gemv)."""
    wt, _, n, k, _ = _operand(w)
    return _gemv(x, wt, None, n, k, bn, ng, num_warps, up, head_rstd)


def gemv_takes(x: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None) -> bool:
    """Whether x [M, K] (unit column stride) @ w^T goes through the GEMV kernel (fp8_linear's and linear's choice
    for decode rows)."""
    m, k = x.shape
    if not 0 < m <= GEMV_MAX_M or bias is not None or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16,
                                                                                          torch.float16):
        return False
    if isinstance(w, Fp8BlockWeight):
        n, kw = w.w.shape
        return w.block == 128 and n % 128 == 0 and kw == k and k % 128 == 0
    return (w.shape[1] == k and w.shape[0] <= BF16_GEMV_MAX_N and k % 128 == 0 and x.dtype == w.dtype
            and w.stride(1) == 1)


def gemv(x: Tensor, w: Fp8BlockWeight | Tensor, **kw) -> Tensor:
    """x [M, K] @ w^T by the GEMV kernel (gemv_takes must hold), fp8 or 16-bit weight; kw: fp8_gemv's /
    bf16_gemv's tiles and up."""
    return fp8_gemv(x, w, **kw) if isinstance(w, Fp8BlockWeight) else bf16_gemv(x, w, **kw)


def gemv_pair_launch(x: Tensor, w1: Fp8BlockWeight | Tensor, w2: Fp8BlockWeight | Tensor) -> tuple:
    """(y1, y2 (empty outputs), grid, the pair kernels' leading arguments, their tile keywords) of x @ w1^T and
    x @ w2^T as one launch, each weight at its own default tile (the launch takes the larger warp count; every
    default tile has 4): for _gemv_pair_kernel and the kernels that extend it."""
    m, k = x.shape
    (a, sa, n1, _, (bn1, ng1, warps1)), (b, sb, n2, _, (bn2, ng2, warps2)) = _operand(w1), _operand(w2)
    y1 = torch.empty(m, n1, dtype=x.dtype, device=x.device)
    y2 = torch.empty(m, n2, dtype=x.dtype, device=x.device)
    args = (x, k, x.stride(0),
            a, a if sa is None else sa, y1, n1, a.stride(0), 0 if sa is None else sa.stride(0), y1.stride(0),
            b, b if sb is None else sb, y2, n2, b.stride(0), 0 if sb is None else sb.stride(0), y2.stride(0))
    tiles = dict(BN1=bn1, NG1=_ng(ng1, k), SCALED1=sa is not None, BN2=bn2, NG2=_ng(ng2, k), SCALED2=sb is not None,
                 EARLY=GEMV_EARLY_LOAD, STEP_SUM=GEMV_STEP_SUM, num_warps=max(warps1, warps2), **pdl_launch())
    return y1, y2, (m, triton.cdiv(n1, bn1) + triton.cdiv(n2, bn2)), args, tiles


def gemv_pair(x: Tensor, w1: Fp8BlockWeight | Tensor, w2: Fp8BlockWeight | Tensor) -> tuple[Tensor, Tensor]:
    """(x @ w1^T, x @ w2^T) in one launch (gemv_takes must hold for both); each weight fp8 or 16-bit."""
    y1, y2, grid, args, tiles = gemv_pair_launch(x, w1, w2)
    _gemv_pair_kernel[grid](*args, **tiles)
    return y1, y2


def swiglu_gemv_route(gate: Tensor, up: Tensor, w: Fp8BlockWeight | Tensor, logits: Tensor, top_k: int,
                      renormalize: bool, bn: int) -> tuple[Tensor, Tensor, Tensor]:
    """(silu(gate) * up @ W^T [M, N], topk_ids [M, k] int64, topk_weights [M, k] float32) in one launch: the
    SwiGLU-formed GEMV (gemv with up, BN = bn rows per program) and moe_route(logits [M, E], top_k, renormalize).
    gemv_takes(gate, w) must hold, up is gate's other half (as for gemv), logits columns contiguous."""
    m, e = logits.shape
    wt, scale, n, k, (_, ng, num_warps) = _operand(w)
    y = torch.empty(m, n, dtype=gate.dtype, device=gate.device)
    ids = torch.empty(m, top_k, dtype=torch.int64, device=gate.device)
    weights = torch.empty(m, top_k, dtype=torch.float32, device=gate.device)
    _swiglu_gemv_route_kernel[(m, triton.cdiv(n, bn) + 1)](
        gate, wt, wt if scale is None else scale, y, n, k, gate.stride(0), wt.stride(0),
        0 if scale is None else scale.stride(0), y.stride(0), (up.data_ptr() - gate.data_ptr()) // gate.element_size(),
        logits, ids, weights, e, logits.stride(0),
        BN=bn, NG=_ng(ng, k), SCALED=scale is not None, TOPK=top_k, BE=triton.next_power_of_2(e),
        BK=triton.next_power_of_2(top_k), RENORM=renormalize, EARLY=GEMV_EARLY_LOAD, STEP_SUM=GEMV_STEP_SUM,
        num_warps=num_warps, **pdl_launch())
    return y, ids, weights


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain projection (the "linear" op): bf16_gemv for up to GEMV_MAX_M rows of a 16-bit weight with K % 128 == 0
    and at most BF16_GEMV_MAX_N outputs, else F.linear."""
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    if 0 < rows <= GEMV_MAX_M:
        x2 = x.reshape(rows, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if gemv_takes(x2, weight, bias):
            return bf16_gemv(x2, weight).view(*x.shape[:-1], n)
    return F.linear(x, weight, bias)


_TICKETS: dict[tuple[torch.device, int], Tensor] = {}
TICKETS = 1 << 16                           # split-K counters per stream (the most output tiles of one call)


def _tickets(device: torch.device) -> Tensor:
    """fp8_dot's split-K counters: int32, zero between calls (each tile's last program resets its own), one buffer
    per stream so that calls on two streams (a side branch) never share a counter. A buffer first made inside a
    CUDA-graph capture (its stream is the capture stream) comes from the graph's pool and its zeroing becomes a
    node of the graph, ahead of the kernels that use it: still zero at every replay."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    t = _TICKETS.get((device, stream))
    if t is None:
        t = _TICKETS[(device, stream)] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return t


def fp8_dot(x: Tensor, w: Fp8BlockWeight, w8a8: bool = True, bm: int = 128, bn: int = 128, group_m: int = 8,
            num_warps: int = 8, num_stages: int = 3, split: int = 1, swap: bool = False) -> Tensor:
    n, k = _check(w)
    m = x.shape[0]
    if w8a8:
        a, a_s = quantize_act_fp8(x)
    else:
        a, a_s = x, x
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    s = w.scale_inv.float().contiguous()
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if (k // 128) % split or tiles > TICKETS:
        split = 1
    part, cnt = (torch.empty(tiles * split * bm * bn, dtype=torch.float32, device=x.device), _tickets(x.device)) \
        if split > 1 else (y, y)
    _fp8_dot_kernel[(tiles, split)](a, a_s, w.w, s, y, part, cnt, m, n, k, a.stride(0), a_s.stride(0),
                                    w.w.stride(0), s.stride(0), y.stride(0), W8A8=w8a8, BM=bm, BN=bn,
                                    GROUP_M=group_m, SPLIT=split, SWAP=swap and not w8a8, num_warps=num_warps,
                                    num_stages=num_stages, **pdl_launch())
    return y


def small_m_tiles(m: int, n: int, k: int, swap: bool | None = None) -> dict:
    """fp8_dot tiles for GEMV_MAX_M < m <= SMALL_M_MAX rows (see the module docstring). H100 sweep
    (scripts/gpu_check.py --only fp8, docs/perf-notes.md): 12288 x 2048 at 8 rows bn 32 14.4 us (bn 64 16.5,
    bn 16 21.7), at 32 rows bn 64 18.2 us (bn 32 21.7); 2048 x 4096 bn 16 14.3 / 15.0 us (bn 64 23). Split-K
    doubles the programs while they stay within SPLIT_PROGRAMS (narrow outputs gave fewer programs than SMs: 2048
    outputs in 128 tiles of 16; H100, 2026-12-05: 12288 x 2048 at 32 rows 17.5 us unsplit against 20.0 split in
    two, 9216 x 2048 17.1 against 18.9, 2048 x 4096 12.6 split 2 against 15.4 split 4; see SPLIT_MIN_STEPS).
    swap: the weights as the MMA's first operand (fp8_dot's SWAP), 64 weight rows per tile (one warpgroup of 4
    warps x 16 rows: with fewer, offline SASS shows the warps converting the same weights) and at least
    SWAP_MIN_STEPS steps per program; None: SMALL_M_SWAP ("auto": N < 4096 and K >= 4096)."""
    if swap is None:
        swap = (n < 4096 and k >= 4096) if SMALL_M_SWAP == "auto" else bool(SMALL_M_SWAP)
    bn = 64 if swap else 16 if n < 4096 else 32 if m <= 16 else 64
    bm = max(16, triton.next_power_of_2(m))
    tiles, steps = triton.cdiv(m, bm) * triton.cdiv(n, bn), k // 128
    min_steps = SWAP_MIN_STEPS if swap else SPLIT_MIN_STEPS
    split = 1
    while (split * 2 <= min(MAX_SPLIT, steps // min_steps) and steps % (split * 2) == 0
           and tiles * split * 2 <= SPLIT_PROGRAMS):
        split *= 2
    return dict(bm=bm, bn=bn, group_m=1, num_warps=4, num_stages=4, split=split, swap=swap)


def fp8_scaled_mm(x: Tensor, w: Fp8BlockWeight) -> Tensor:
    """torch's block-scaled fp8 GEMM (cuBLASLt), if this torch build has it: 1x128 activation scales (M-major
    layout, M padded to a multiple of 4) and 128x128 weight scales."""
    m = x.shape[0]
    pad = (-m) % 4
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    a, a_s = quantize_act_fp8(xp)
    out = F.scaled_mm(a, w.w.t(), a_s.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                      w.scale_inv.float().t(), F.ScalingType.BlockWise128x128, output_dtype=x.dtype)
    return out[:m]


def fp8_linear(x: Tensor, w: Fp8BlockWeight, bias: Tensor | None = None, path: str = "auto",
               tiles: dict | None = None) -> Tensor:
    """x [..., K] -> [..., N]; path auto | gemv | w8a8 | w8a16 | dequant | scaled_mm; tiles: fp8_dot's keyword
    arguments for w8a16 (default small_m_tiles for small M, else fp8_dot's).
    auto: GEMV up to GEMV_MAX_M rows (memory bound), w8a16 with small tiles up to SMALL_M_MAX, else LARGE_M_PATH
    (dequant + cuBLAS; docs/perf-notes.md)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if path == "auto":
        if m <= GEMV_MAX_M:
            path = "gemv"
        elif m <= SMALL_M_MAX:
            path = "w8a16"
        else:
            path = LARGE_M_PATH
    if path == "gemv":
        y = fp8_gemv(x2, w)
    elif path == "w8a8":
        y = fp8_dot(x2, w, w8a8=True)
    elif path == "w8a16":
        y = fp8_dot(x2, w, w8a8=False, **(tiles or (small_m_tiles(m, *w.w.shape) if m <= SMALL_M_MAX else {})))
    elif path == "dequant":
        y = F.linear(x2, dequantize_fp8(w, x2.dtype))
    elif path == "scaled_mm":
        y = fp8_scaled_mm(x2, w)
    else:
        raise ValueError(f"unknown fp8 linear path {path!r}")
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])
