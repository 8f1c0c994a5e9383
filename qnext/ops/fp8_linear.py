"""Dense projections, torch references (CPU path, oracles of qnext.ops.triton_linear_fp8): fp8_linear is
x [..., K] @ dequantize(W)^T with W an Fp8BlockWeight [N, K] (any N, K) -> [..., N] in x.dtype; linear is F.linear
over a plain weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.quant import Fp8BlockWeight, dequantize_fp8_block
from qnext.ops.registry import register


@register("fp8_linear", "torch")
def fp8_linear(x: torch.Tensor, w: Fp8BlockWeight, bias: torch.Tensor | None = None,
               path: str = "auto") -> torch.Tensor:
    return F.linear(x, dequantize_fp8_block(w, x.dtype), bias)


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
