"""Dense projections fused with a neighbour for decode rows (Triton), each saving one launch of the batch-1 step:

    silu_mul_linear(gate, up, w) = (silu(gate) * up) @ W^T   the GEMV forms its input from the stacked gate | up
                                                              output (shared expert, then its down projection)
    linear_pair(x, w1, w2) = (x @ W1^T, x @ W2^T)             two GEMVs of one input in one launch (in_proj_qkvz
                                                              with in_proj_ba; shared-expert gate_up with the router)
    silu_mul_linear_route(gate, up, w, bias, logits, k, renorm)  silu_mul_linear beside moe_route(logits, k, renorm)
                                                              in one launch (the shared expert's down projection
                                                              and the routing both read the pair above)
    linear_pair_conv_update_(x, w1, w2, conv, cache, ...)   linear_pair whose first output also goes through the
                                                              decode conv (causal_conv1d_update_) in the GEMV's
                                                              epilogue (in_proj_qkvz with in_proj_ba, then the GDN
                                                              layer's conv: each program owns its outputs' channels)
    gdn_decode_project_(q, k, v, a, b, ..., z, nw, eps, w)    the GDN decode step, its output's gated RMSNorm and
                                                              out_proj in two launches: the recurrent kernel gates
                                                              o and sums each head's squares, the GEMV scales each
                                                              head's sums by its rsqrt (no norm kernel between)
Semantics of qnext.ops.fp8_linear (W fp8 block-scaled or plain 16-bit); each output is rounded as the separate
kernels round it (SwiGLU's input to x's dtype before the projection reads it), so results are theirs bit for bit,
except gdn_decode_project_'s (see there).

Why by hand: no library fuses an activation into a weight-only FP8 GEMV's prologue, or launches two differently
quantized GEMVs as one grid. The batch-1 step is a chain of ~740 dependent kernels, each paying its launch, wait
and ramp; these remove 48 + 84 + 48 + 36 of them, and 36 more with FUSE_OUT_NORM. Rows past GEMV_MAX_M, unaligned
shapes or biases take separate kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.fla_gdn import gdn_decode_gated_
from qnext.ops.quant import Fp8BlockWeight
from qnext.ops.triton_conv1d import causal_conv1d_update_, conv_step, conv_window
from qnext.ops.triton_ffn import moe_route, silu_mul
from qnext.ops.triton_norm import gated_rmsnorm
from qnext.ops.triton_linear_fp8 import (_gemv_program, fp8_linear, gemv, gemv_pair, gemv_pair_launch, gemv_takes,
                                         linear, swiglu_gemv_route)

Tensor = torch.Tensor

# False: separate kernels as before (A/B runs: scripts/gpu_e2e.py --extras knobs).
FUSE_DECODE_PROJECTIONS = True
# False: silu_mul_linear_route launches the routing apart (A/B runs: scripts/gpu_e2e.py --extras early).
FUSE_ROUTE = True
# False: linear_pair_conv_update_ runs the pair and the conv as two kernels (A/B runs: gpu_e2e.py --extras conv).
FUSE_IN_PROJ_CONV = True
# True: gdn_decode_project_ finishes the norm in out_proj's GEMV; False: the recurrence, the norm kernel and the GEMV
# apart. H100, FP8 experts (256) at b1 (docs/benchmarks.md, 2026-12-06 eighth session): replay 2.267 / 2.272 ms
# against 2.299; int4 decode-b1 423.2 / 423.2 against 418.8 tok/s (ninth session), with the model-level GPU checks
# (gpu_e2e.py's parity, tests/test_gpu_engine.py) passing with it on. A/B: gpu_e2e.py --extras outnorm.
FUSE_OUT_NORM = True
# The fused conv's state and weights loaded before the GEMV's K loop (held through it: 128 registers against the
# pair's 96 offline) or after it (a round trip at the end); A/B: gpu_e2e.py --extras conv.
CONV_EARLY_LOAD = True
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
def _gemv_pair_conv_kernel(x_ptr, K, stride_xm,
                           w1_ptr, s1_ptr, y1_ptr, N1, stride_w1, stride_s1, stride_y1,
                           w2_ptr, s2_ptr, y2_ptr, N2, stride_w2, stride_s2, stride_y2,
                           chan_ptr, cw_ptr, state_ptr, slots_ptr, init_ptr, mixed_ptr, stride_mm, stride_ss,
                           stride_sc,
                           BN1: tl.constexpr, NG1: tl.constexpr, SCALED1: tl.constexpr,
                           BN2: tl.constexpr, NG2: tl.constexpr, SCALED2: tl.constexpr,
                           KW: tl.constexpr, BKW: tl.constexpr, HAS_INIT: tl.constexpr, CONV_EARLY: tl.constexpr,
                           EARLY: tl.constexpr = True, STEP_SUM: tl.constexpr = True, PDL: tl.constexpr = False):
    """qnext.ops.triton_linear_fp8's _gemv_pair_kernel, and each program of the first GEMV (row m, outputs rows)
    then runs the conv step of the channels those outputs feed: chan [N1] int32 names each output's conv channel
    (-1: none, in_proj_qkvz's z columns); conv weights cw [C, KW], conv state [S, C, KW-1] at slot slots[m], zeros
    where init[m] is false; the conv output (SiLU'd) goes to mixed [M, C]. A channel is fed by one output, so no
    two programs touch one channel's state. CONV_EARLY: the state and weights are loaded before the PDL wait, as
    _conv_update_kernel loads them (the kernel before this one, the input norm, writes neither), and held through
    the K loop; else after it."""
    m = tl.program_id(0)
    p = tl.program_id(1)
    tiles1 = tl.cdiv(N1, BN1)
    if p < tiles1:
        rows = p * BN1 + tl.arange(0, BN1)
        ch = tl.load(chan_ptr + rows, mask=rows < N1, other=-1)
        cmask = ch >= 0
        j = tl.arange(0, BKW)
        base = state_ptr + tl.load(slots_ptr + m).to(tl.int64) * stride_ss + ch * stride_sc
        if CONV_EARLY:
            window, w = conv_window(base, cw_ptr, init_ptr, m, ch, cmask, j, KW, HAS_INIT)
        y = _gemv_program(x_ptr, w1_ptr, s1_ptr, y1_ptr, m, p, N1, K, stride_xm, stride_w1, stride_s1, stride_y1, 0,
                          BN1, NG1, SCALED1, EARLY, STEP_SUM, False, PDL)
        if not CONV_EARLY:
            window, w = conv_window(base, cw_ptr, init_ptr, m, ch, cmask, j, KW, HAS_INIT)
        acc = conv_step(y, window, w, base, j, cmask, KW, True)
        tl.store(mixed_ptr + m.to(tl.int64) * stride_mm + ch, acc.to(mixed_ptr.dtype.element_ty), mask=cmask)
    else:
        _gemv_program(x_ptr, w2_ptr, s2_ptr, y2_ptr, m, p - tiles1, N2, K, stride_xm, stride_w2, stride_s2,
                      stride_y2, 0, BN2, NG2, SCALED2, EARLY, STEP_SUM, False, PDL)


def linear_pair_conv_update_(x: Tensor, w1: Fp8BlockWeight | Tensor, w2: Fp8BlockWeight | Tensor,
                             conv_weight: Tensor, conv_cache: Tensor, state_slots: Tensor,
                             has_initial_state: Tensor | None, x_cols: Tensor,
                             x_chans: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y1, y2) = linear_pair(x, w1, w2) and the SiLU'd decode conv of y1's columns x_cols [C] (channel c reads
    column x_cols[c]; x_chans [N1] is the inverse map, -1 for columns no channel reads): causal_conv1d_update_(y1,
    conv_weight [C, K], conv_cache [S, C, K-1] in place at state_slots [M], has_initial_state, x_cols=x_cols)
    -> (y1, y2, conv output [M, C]). One launch for decode rows (see _gemv_pair_conv_kernel), else linear_pair,
    then the conv kernel."""
    c = conv_weight.shape[0]
    cw = conv_weight.reshape(c, -1)
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    if not (FUSE_IN_PROJ_CONV and FUSE_DECODE_PROJECTIONS and x2.dim() == 2 and gemv_takes(x2, w1, None)
            and gemv_takes(x2, w2, None) and conv_cache.stride(-1) == 1 and cw.is_contiguous()):
        y1, y2 = linear_pair(x, w1, w2)
        return y1, y2, causal_conv1d_update_(y1, conv_weight, conv_cache, state_slots, has_initial_state,
                                             x_cols=x_cols)
    y1, y2, grid, args, tiles = gemv_pair_launch(x2, w1, w2)
    mixed = torch.empty(x2.shape[0], c, dtype=x.dtype, device=x.device)
    _gemv_pair_conv_kernel[grid](
        *args, x_chans, cw, conv_cache, state_slots,
        has_initial_state if has_initial_state is not None else state_slots, mixed, mixed.stride(0),
        conv_cache.stride(0), conv_cache.stride(1), KW=cw.shape[1], BKW=triton.next_power_of_2(cw.shape[1]),
        HAS_INIT=has_initial_state is not None, CONV_EARLY=CONV_EARLY_LOAD, **tiles)
    return y1, y2, mixed


def gdn_decode_project_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                        ssm_cache: Tensor, state_slots: Tensor, has_initial_state: Tensor | None, z: Tensor,
                        norm_weight: Tensor, eps: float, w: Fp8BlockWeight | Tensor) -> Tensor:
    """qnext.ops.fp8_linear.gdn_decode_project_ in two launches when the GEMV takes the rows, heads are 128 wide
    (one per scale group) and z's rows have a unit last stride: the recurrent kernel stores o * w * silu(z) and each
    head's partial sums of squares of o, and out_proj's GEMV scales each head's sum of products by its
    rsqrt(mean square + eps). That removes the norm kernel, a store -> load round trip on the batch-1 chain.
    Rounding: the norm's output is rounded to o's dtype before the head's scale, not after (a reordering, not
    a bit-equal fusion). Else the three apart."""
    t, hv, dv = v.shape
    fused = (FUSE_DECODE_PROJECTIONS and FUSE_OUT_NORM and dv == 128 and z.dim() == 4 and z.shape[0] == t
             and z.shape[1] * z.shape[2] == hv and z.shape[3] == dv and z.stride(-1) == 1
             and norm_weight.is_contiguous()
             and gemv_takes(torch.empty(t, hv * dv, dtype=v.dtype, device="meta"), w, None))
    if not fused:
        o, _ = gdn_decode_gated_(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state)
        return _project(gated_rmsnorm(o.view(z.shape), z, norm_weight, eps).reshape(t, -1), w)
    o, sumsq = gdn_decode_gated_(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state,
                                 gate=(z, norm_weight))
    return gemv(o.view(t, -1), w, head_rstd=(sumsq, eps))
