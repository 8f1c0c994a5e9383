"""Dense projections, torch references (CPU path, oracles of qnext.ops.triton_linear_fp8 and
qnext.ops.triton_fused_linear): fp8_linear is x [..., K] @ dequantize(W)^T with W an Fp8BlockWeight [N, K] (any N,
K) -> [..., N] in x.dtype; linear is F.linear over a plain weight; silu_mul_linear projects silu_mul's output and
linear_pair makes two projections of one input (W fp8 or plain), silu_mul_linear_route is silu_mul_linear beside
the MoE routing; each one launch on CUDA for decode rows. gdn_decode_project_ is the GDN layer's decode output
(recurrence, gated norm, out_proj; two launches on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.delta_rule import gdn_decode_
from qnext.ops.moe import moe_route, silu_mul
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


@register("gdn_decode_project_", "torch")
def gdn_decode_project_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        A_log: torch.Tensor, dt_bias: torch.Tensor, ssm_cache: torch.Tensor, state_slots: torch.Tensor,
                        has_initial_state: torch.Tensor | None, z: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        w: Fp8BlockWeight | torch.Tensor) -> torch.Tensor:
    """The GDN layer's decode output, one token per sequence: o = gdn_decode_(q, ..., has_initial_state) [T, Hv,
    Dv] (state in place), then gated_rmsnorm(o, z, norm_weight, eps) with z [T, Hk, Hv / Hk, Dv], flattened to
    [T, Hv * Dv] @ W^T -> [T, N]."""
    o = gdn_decode_(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state)
    return _project(gated_rmsnorm(o.view(z.shape), z, norm_weight, eps).reshape(z.shape[0], -1), w, None)
