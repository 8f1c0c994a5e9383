"""Dense projections fused with a neighbour for decode rows (Triton), each saving one launch of the batch-1 step:

    silu_mul_linear(gate, up, w) = (silu(gate) * up) @ W^T   the GEMV forms its input from the stacked gate | up
                                                              output (shared expert, then its down projection)
    linear_pair(x, w1, w2) = (x @ W1^T, x @ W2^T)             two GEMVs of one input in one launch (in_proj_qkvz
                                                              with in_proj_ba; shared-expert gate_up with the router)
    silu_mul_linear_route(gate, up, w, bias, logits, k, renorm)  silu_mul_linear beside moe_route(logits, k, renorm)
                                                              in one launch (the shared expert's down projection
                                                              and the routing both read the pair above)
Semantics of qnext.ops.fp8_linear (W fp8 block-scaled or plain 16-bit); each output is rounded as the separate
kernels round it (SwiGLU's input to x's dtype before the projection reads it), so results are theirs bit for bit.

Why by hand: no library fuses an activation into a weight-only FP8 GEMV's prologue, or launches two differently
quantized GEMVs as one grid. The batch-1 step is a chain of ~740 dependent kernels, each paying its launch, wait
and ramp; these remove 48 + 84 + 48 of them. Rows past GEMV_MAX_M, unaligned shapes or biases take separate kernels.
"""

from __future__ import annotations

import torch

from qnext.ops.quant import Fp8BlockWeight
from qnext.ops.triton_ffn import moe_route, silu_mul
from qnext.ops.triton_linear_fp8 import fp8_linear, gemv, gemv_pair, gemv_takes, linear, swiglu_gemv_route

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
