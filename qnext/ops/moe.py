"""Routed experts (fused MoE), torch reference: the CPU path and the oracle of qnext.ops.triton_moe.fused_moe.

x [M, H]; w13 [E, 2I, H] (gate rows first), w2 [E, H, I], each a plain tensor or a quantized weight of
qnext.ops.quant (Fp8BlockWeight / Int4GroupWeight, dequantized per used expert to x.dtype);
topk_weights [M, k] float32, topk_ids [M, k] -> [M, H] in x.dtype:
    y = sum_k w_k * down_e(silu(gate_e x) * up_e x), accumulated in float32.
Tokens are grouped by expert (one matmul pair per used expert); the counts come to the host (CPU only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.quant import QuantWeight, _select, dequantize
from qnext.ops.registry import register

Tensor = torch.Tensor


def num_experts(w: QuantWeight) -> int:
    return w.shape[0]


@register("fused_moe", "torch")
def fused_moe(x: Tensor, w13: QuantWeight, w2: QuantWeight, topk_weights: Tensor, topk_ids: Tensor, *,
              path: str = "auto", config: dict | None = None, reduce: bool = True) -> Tensor:
    # reduce=False lets a fast path return its per-expert outputs [M, k, H] unsummed; this one always sums
    k = topk_ids.shape[1]
    flat = topk_ids.flatten().long()
    order = flat.argsort(stable=True)                      # assignments grouped by expert
    counts = torch.bincount(flat, minlength=num_experts(w13)).tolist()
    weights = topk_weights.flatten().float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        picks = order[start:start + n]
        start += n
        tokens = picks // k
        w_gu, w_d = _weight(w13, e, x.dtype), _weight(w2, e, x.dtype)     # [2I, H], [H, I]
        gate, up = F.linear(x[tokens], w_gu).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_d)
        out.index_add_(0, tokens, y.float() * weights[picks, None])
    return out.to(x.dtype)


def _weight(w: QuantWeight, e: int, dtype: torch.dtype) -> Tensor:
    if isinstance(w, Tensor):
        return w[e]
    return dequantize(_select(w, e), dtype)


# ---- the glue around the experts (one Triton launch each in qnext.ops.triton_ffn) -------------------------------

@register("moe_route", "torch")
def moe_route(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (topk_ids [T, k] int64, topk_weights [T, k] float32): p = softmax(logits) in
    float32, the k largest, divided by their sum when renormalize (norm_topk_prob)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


@register("greedy_argmax", "torch")
def greedy_argmax(logits: Tensor) -> Tensor:
    """logits [B, V] -> [B] int64, the first index of each row's maximum (the sampler's greedy rows)."""
    return logits.argmax(dim=-1)


@register("silu_mul", "torch")
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU activation: gate, up [..., I] -> silu(gate) * up."""
    return F.silu(gate) * up


@register("sigmoid_gate_add", "torch")
def sigmoid_gate_add(y: Tensor, gate: Tensor, s: Tensor) -> Tensor:
    """The shared expert's entry: y [T, H] (or the routed experts' unsummed outputs [T, k, H], summed here);
    s [T, H]; gate [T, 1] -> y + sigmoid(gate) * s."""
    if y.dim() == 3:
        y = y.sum(1)
    return y + torch.sigmoid(gate) * s
