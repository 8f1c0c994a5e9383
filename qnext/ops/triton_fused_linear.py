"""Dense projections fused with a neighbour for decode rows (Triton), each saving one launch of the batch-1 step:

    silu_mul_linear(gate, up, w) = (silu(gate) * up) @ W^T   the GEMV forms its input from the stacked gate | up
                                                              output (shared expert, then its down projection)
    linear_pair(x, w1, w2) = (x @ W1^T, x @ W2^T)             two GEMVs of one input in one launch (in_proj_qkvz
                                                              with in_proj_ba; shared-expert gate_up with the router)
    silu_mul_linear_route(gate, up, w, bias, logits, k, renorm)  silu_mul_linear beside moe_route(logits, k, renorm)
                                                              in one launch (the shared expert's down projection
                                                              and the routing both read the pair above)
    gated_rmsnorm_linear(x, z, nw, eps, w) = gated_rmsnorm(x, z, nw, eps) @ W^T   the GEMV forms the GDN output
                                                              norm of each 128-wide value head (one scale group) on
                                                              the way in (then out_proj)
Semantics of qnext.ops.fp8_linear (W fp8 block-scaled or plain 16-bit); each output is rounded as the separate
kernels round it (SwiGLU's input to x's dtype before the projection reads it), so results are theirs bit for bit;
the gated norm's sum of squares may differ from the norm kernel's in its last bit (another reduction order).

Why by hand: no library fuses an activation into a weight-only FP8 GEMV's prologue, or launches two differently
quantized GEMVs as one grid. The batch-1 step is a chain of ~740 dependent kernels, each paying its launch, wait
and ramp; these remove 48 + 84 + 48 + 36 of them. Rows past GEMV_MAX_M, unaligned shapes or biases take separate
kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.quant import Fp8BlockWeight
from qnext.ops.triton_ffn import moe_route, silu_mul
from qnext.ops.triton_linear_fp8 import (GEMV_EARLY_LOAD, _gemv_step, _gemv_weight_tile, _ng, _operand, fp8_linear,
                                         gemv, gemv_pair, gemv_takes, linear, swiglu_gemv_route)
from qnext.ops.triton_norm import gated_rmsnorm

Tensor = torch.Tensor

# False: separate kernels as before (A/B runs: scripts/gpu_e2e.py --extras knobs).
FUSE_DECODE_PROJECTIONS = True
# False: silu_mul_linear_route launches the routing apart (A/B runs: scripts/gpu_e2e.py --extras early).
FUSE_ROUTE = True
# Rows per program of the SwiGLU-formed down projection (2048 x 512). H200, scripts/gpu_check.py --only fused
# (docs/benchmarks.md, 2026-12-03 third session): two kernels 2.3 us; formed in the GEMV bn4 1.7, bn8 1.6, bn16 1.5
# (an earlier sweep: bn8 and bn16 1.5, bn4 1.8, bn2 2.0). The end-to-end runs used bn8.
SWIGLU_BN = 8


def _project(x: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None = None) -> Tensor:
    return fp8_linear(x, w, bias) if isinstance(w, Fp8BlockWeight) else linear(x, w, bias)


def _swiglu_fusable(gate: Tensor, up: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None) -> bool:
    """Whether the GEMV can form silu(gate) * up itself: both column-contiguous views with one row stride (the
    halves of one stacked gate | up projection), a few rows."""
    return (FUSE_DECODE_PROJECTIONS and gate.dim() == 2 and gate.shape == up.shape and gate.stride() == up.stride()
            and gemv_takes(gate, w, bias))


def silu_mul_linear(gate: Tensor, up: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None = None) -> Tensor:
    """gate, up [T, I] -> (silu(gate) * up) @ W^T [T, N]; fused when _swiglu_fusable."""
    if _swiglu_fusable(gate, up, w, bias):
        return gemv(gate, w, up=up, bn=SWIGLU_BN)
    return _project(silu_mul(gate, up), w, bias)


def silu_mul_linear_route(gate: Tensor, up: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None,
                          logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(silu_mul_linear(gate, up, w, bias), *moe_route(logits, top_k, renormalize)); one launch when
    _swiglu_fusable and logits [T, E] (columns contiguous) has gate's rows."""
    if (FUSE_ROUTE and _swiglu_fusable(gate, up, w, bias) and logits.dim() == 2 and logits.shape[0] == gate.shape[0]
            and logits.stride(-1) == 1 and 0 < top_k <= logits.shape[1]):
        return swiglu_gemv_route(gate, up, w, logits, top_k, renormalize, bn=SWIGLU_BN)
    return (silu_mul_linear(gate, up, w, bias), *moe_route(logits, top_k, renormalize))


def linear_pair(x: Tensor, w1: Fp8BlockWeight | Tensor, w2: Fp8BlockWeight | Tensor) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (x @ W1^T [T, N1], x @ W2^T [T, N2]); one launch for decode rows."""
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    if FUSE_DECODE_PROJECTIONS and x2.dim() == 2 and gemv_takes(x2, w1, None) and gemv_takes(x2, w2, None):
        return gemv_pair(x2, w1, w2)
    return _project(x, w1), _project(x, w2)


@triton.jit
def _gated_norm_x(x_row, z_row, nw_ptr, gg, j, groups, R, sz1, sz2, eps):
    """x's scale groups gg [NG] (each one value head of 128) as the gated RMSNorm leaves them, float32 [NG, 128]:
    nw * x * rsqrt(mean(x^2) + eps) * silu(z), in qnext.ops.triton_norm's order of operations and rounded to x's
    dtype as it stores them. Head h's z lies at z_row + (h // R) * sz1 + (h % R) * sz2 (a view into in_proj_qkvz's
    output, R value heads per key head)."""
    gm = (gg < groups)[:, None]
    x = tl.load(x_row + gg[:, None] * 128 + j[None, :], mask=gm, other=0).to(tl.float32)
    z = tl.load(z_row + ((gg // R) * sz1 + (gg % R) * sz2)[:, None] + j[None, :], mask=gm, other=0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / 128 + eps)[:, None]
    y = x * rstd * tl.load(nw_ptr + j).to(tl.float32)[None, :] * (z * tl.sigmoid(z))
    return y.to(x_row.dtype.element_ty).to(tl.float32)


@triton.jit
def _gated_norm_gemv_kernel(x_ptr, z_ptr, nw_ptr, w_ptr, s_ptr, y_ptr, N, K, R, eps, stride_xm, sz0, sz1, sz2,
                            stride_wn, stride_sn, stride_ym, BN: tl.constexpr, NG: tl.constexpr,
                            SCALED: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr = False):
    """grid (M, cdiv(N, BN)): row m's outputs [pid_n * BN, + BN) of gated_rmsnorm(x, z) @ W^T, x [M, K]
    (K / 128 heads), W as in qnext.ops.triton_linear_fp8's _fp8_gemv_kernel (its steps, with the step sums)."""
    m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    j = tl.arange(0, 128)
    s_row = s_ptr + ((pid_n * BN) // 128) * stride_sn
    x_row, z_row = x_ptr + m * stride_xm, z_ptr + m * sz0
    w_rows = w_ptr + rows[:, None, None] * stride_wn
    groups = K // 128
    gg = tl.arange(0, NG)
    if EARLY:               # weights are never written during a step: load before the wait
        w, sc = _gemv_weight_tile(w_rows, s_row, gg, j, rmask, groups, SCALED)
        pdl_wait_then_release(PDL)
    else:
        pdl_wait_then_release(PDL)
        w, sc = _gemv_weight_tile(w_rows, s_row, gg, j, rmask, groups, SCALED)
    acc = _gemv_step(w, sc, _gated_norm_x(x_row, z_row, nw_ptr, gg, j, groups, R, sz1, sz2, eps), SCALED, True)
    for g0 in range(NG, groups, NG):
        gg = g0 + tl.arange(0, NG)
        w, sc = _gemv_weight_tile(w_rows, s_row, gg, j, rmask, groups, SCALED)
        acc += _gemv_step(w, sc, _gated_norm_x(x_row, z_row, nw_ptr, gg, j, groups, R, sz1, sz2, eps), SCALED, True)
    tl.store(y_ptr + m * stride_ym + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rmask)


def gated_rmsnorm_linear(x: Tensor, z: Tensor, norm_weight: Tensor, eps: float, w: Fp8BlockWeight | Tensor,
                         bias: Tensor | None = None) -> Tensor:
    """x, z [T, H, D] or [T, Hk, R, D] of one shape -> gated_rmsnorm(x, z, norm_weight, eps) as [T, H * D] @ W^T.
    One launch for decode rows with 128-wide heads, x contiguous and z's heads at unit column stride (the GDN
    layer's out_proj input and its z, a view into in_proj_qkvz's output); else the norm kernel, then the
    projection."""
    t, d = x.shape[0], x.shape[-1]
    x2 = x.view(t, -1) if x.is_contiguous() else None
    if (FUSE_DECODE_PROJECTIONS and x2 is not None and d == 128 and x.dim() in (3, 4) and z.shape == x.shape
            and z.stride(-1) == 1 and gemv_takes(x2, w, bias)):
        wt, scale, n, k, (bn, ng, num_warps) = _operand(w)
        y = torch.empty(t, n, dtype=x.dtype, device=x.device)
        r, sz2 = (z.shape[2], z.stride(2)) if z.dim() == 4 else (1, 0)
        _gated_norm_gemv_kernel[(t, triton.cdiv(n, bn))](
            x2, z, norm_weight, wt, wt if scale is None else scale, y, n, k, r, eps, x2.stride(0), z.stride(0),
            z.stride(1), sz2, wt.stride(0), 0 if scale is None else scale.stride(0), y.stride(0), BN=bn,
            NG=_ng(ng, k), SCALED=scale is not None, EARLY=GEMV_EARLY_LOAD, num_warps=num_warps, **pdl_launch())
        return y
    return _project(gated_rmsnorm(x, z, norm_weight, eps).reshape(t, -1), w, bias)
