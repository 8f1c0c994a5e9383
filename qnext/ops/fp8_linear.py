"""FP8 block-scaled linear, torch reference (CPU path, oracle of qnext.ops.triton_linear_fp8.fp8_linear):
x [..., K] @ dequantize(W)^T with W an Fp8BlockWeight [N, K] (any N, K) -> [..., N] in x.dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.quant import Fp8BlockWeight, dequantize_fp8_block
from qnext.ops.registry import register


@register("fp8_linear", "torch")
def fp8_linear(x: torch.Tensor, w: Fp8BlockWeight, bias: torch.Tensor | None = None,
               path: str = "auto") -> torch.Tensor:
    return F.linear(x, dequantize_fp8_block(w, x.dtype), bias)
