"""Dense projections, torch references (CPU path, oracles of qnext.ops.triton_linear_fp8 and
qnext.ops.triton_fused_linear): fp8_linear is x [..., K] @ dequantize(W)^T with W an Fp8BlockWeight [N, K] (any N,
K) -> [..., N] in x.dtype; linear is F.linear over a plain weight; silu_mul_linear and gated_rmsnorm_linear project
the output of silu_mul / gated_rmsnorm (W fp8 or plain), the input formed by the projection's kernel on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.moe import silu_mul
from qnext.ops.norm import gated_rmsnorm
from qnext.ops.quant import Fp8BlockWeight, dequantize_fp8_block
from qnext.ops.registry import register


@register("fp8_linear", "torch")
def fp8_linear(x: torch.Tensor, w: Fp8BlockWeight, bias: torch.Tensor | None = None,
               path: str = "auto") -> torch.Tensor:
    return F.linear(x, dequantize_fp8_block(w, x.dtype), bias)


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _project(x: torch.Tensor, w: Fp8BlockWeight | torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return fp8_linear(x, w, bias) if isinstance(w, Fp8BlockWeight) else linear(x, w, bias)


@register("silu_mul_linear", "torch")
def silu_mul_linear(gate: torch.Tensor, up: torch.Tensor, w: Fp8BlockWeight | torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """gate, up [..., I] -> (silu(gate) * up) @ W^T."""
    return _project(silu_mul(gate, up), w, bias)


@register("gated_rmsnorm_linear", "torch")
def gated_rmsnorm_linear(x: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         w: Fp8BlockWeight | torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x, z [T, ..., D] -> gated_rmsnorm(x, z) flattened to [T, -1] @ W^T."""
    return _project(gated_rmsnorm(x, z, norm_weight, eps).reshape(x.shape[0], -1), w, bias)
