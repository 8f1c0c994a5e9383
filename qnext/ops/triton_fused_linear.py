"""A projection whose input is formed on the way in (Triton): the GEMV kernel builds its activations from the
previous op's raw outputs, so that op has no kernel of its own in a decode step. Semantics of qnext.ops.fp8_linear
(silu_mul_linear, gated_rmsnorm_linear); the roundings are those of the separate Triton kernels (the input rounded
to x's dtype before the projection reads it).

Why by hand: no library fuses an activation or a per-head norm into a weight-only FP8 GEMV's prologue. The batch-1
step is a chain of ~740 dependent kernels; SwiGLU (shared expert) and GDN's gated norm are two of them per layer.
Rows past GEMV_MAX_M, unaligned shapes or other weights take the two kernels as before.
"""

from __future__ import annotations

import torch

from qnext.ops.quant import Fp8BlockWeight
from qnext.ops.triton_ffn import silu_mul
from qnext.ops.triton_linear_fp8 import fp8_linear, gemv, gemv_takes, linear
from qnext.ops.triton_norm import gated_rmsnorm

Tensor = torch.Tensor

# False: the inputs are formed by their own kernels as before (A/B runs: scripts/gpu_e2e.py --extras knobs).
FORM_IN_GEMV = True


def _project(x: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None) -> Tensor:
    return fp8_linear(x, w, bias) if isinstance(w, Fp8BlockWeight) else linear(x, w, bias)


def silu_mul_linear(gate: Tensor, up: Tensor, w: Fp8BlockWeight | Tensor, bias: Tensor | None = None) -> Tensor:
    """gate, up [T, I] -> (silu(gate) * up) @ W^T [T, N]. Fused when both are column-contiguous views with one row
    stride (the halves of one stacked gate | up projection)."""
    if FORM_IN_GEMV and gate.dim() == 2 and gate.shape == up.shape and gate.stride() == up.stride() and gemv_takes(gate, w, bias):
        return gemv(gate, w, up=up)
    return _project(silu_mul(gate, up), w, bias)


def gated_rmsnorm_linear(x: Tensor, z: Tensor, norm_weight: Tensor, eps: float, w: Fp8BlockWeight | Tensor,
                         bias: Tensor | None = None) -> Tensor:
    """x [T, Hk, R, D], z like x (any strides, unit last) -> gated_rmsnorm(x, z) flattened to [T, Hk R D] @ W^T.
    Fused for D = 128 (a value head is one of the GEMV's scale groups) and x contiguous."""
    t, hk, r, d = x.shape
    flat = x.reshape(t, hk * r * d)
    if (FORM_IN_GEMV and d == 128 and x.is_contiguous() and z.shape == x.shape and z.stride(-1) == 1
            and gemv_takes(flat, w, bias)):
        return gemv(flat, w, gated_norm=(z, norm_weight, eps))
    return _project(gated_rmsnorm(x, z, norm_weight, eps).reshape(t, -1), w, bias)
