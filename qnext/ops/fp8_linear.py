"""Dense projections, torch references (CPU path, oracles of qnext.ops.triton_linear_fp8 and
qnext.ops.triton_fused_linear): fp8_linear is x [..., K] @ dequantize(W)^T with W an Fp8BlockWeight [N, K] (any N,
K) -> [..., N] in x.dtype; linear is F.linear over a plain weight; silu_mul_linear projects silu_mul's output and
linear_pair makes two projections of one input (W fp8 or plain), silu_mul_linear_route is silu_mul_linear beside
the MoE routing; each one launch on CUDA for decode rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.moe import moe_route, silu_mul
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


@register("silu_mul_linear_route", "torch")
def silu_mul_linear_route(gate: torch.Tensor, up: torch.Tensor, w: Fp8BlockWeight | torch.Tensor,
                          bias: torch.Tensor | None, logits: torch.Tensor, top_k: int,
                          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu_mul_linear(gate, up, w, bias), topk_ids, topk_weights of moe_route(logits, top_k, renormalize)): the
    MoE block's shared-expert down projection and its routing, which CUDA runs as one launch for decode rows."""
    return (silu_mul_linear(gate, up, w, bias), *moe_route(logits, top_k, renormalize))


@register("linear_pair", "torch")
def linear_pair(x: torch.Tensor, w1: Fp8BlockWeight | torch.Tensor,
                w2: Fp8BlockWeight | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x @ W1^T, x @ W2^T)."""
    return _project(x, w1, None), _project(x, w2, None)
