"""Causal depthwise conv1d + SiLU with a conv state, torch reference.

Channel c at token t: y = silu(sum_j w[c, j] * x[c, t - (K-1) + j]), where inputs before the sequence's first new
token come from its conv state [C, K-1] (the last K-1 inputs seen, oldest first; zeros for a fresh sequence).
After the call the state holds the last K-1 inputs of (old state ++ new tokens). Math in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.fp8_linear import linear_pair
from qnext.ops.registry import register
from qnext.ops.slots import slot_states

Tensor = torch.Tensor


@register("causal_conv1d", "torch")
def causal_conv1d(x: Tensor, weight: Tensor, initial_state: Tensor | None,
                  cu_seqlens: Tensor | list[int], activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """Varlen prefill.

    x [T, C] (N sequences back to back, bounds cu_seqlens [N+1]); weight [C, K];
    initial_state [N, C, K-1] or None (zeros) -> (y [T, C] in x.dtype, final_state [N, C, K-1] in x.dtype).
    """
    bounds = [int(c) for c in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    n, (t, c), k = len(bounds) - 1, x.shape, weight.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(n, c, k - 1)
    w = weight.float()[:, None, :]                                  # [C, 1, K]
    y, finals = torch.empty_like(x), []
    for i in range(n):  # prefill: one sequence at a time
        s, e = bounds[i], bounds[i + 1]
        window = torch.cat((initial_state[i].float(), x[s:e].float().t()), dim=1)   # [C, K-1+L]
        out = F.conv1d(window[None], w, groups=c)[0]                # [C, L]
        if activation == "silu":
            out = F.silu(out)
        y[s:e] = out.t().to(x.dtype)
        finals.append(window[:, window.shape[1] - (k - 1):])
    final = torch.stack(finals).to(x.dtype) if finals else initial_state.clone()
    return y, final


@register("causal_conv1d_update", "torch")
def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor,
                         activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """One new token for each of N sequences, vectorised.

    x [N, C]; state [N, C, K-1]; weight [C, K] -> (y [N, C] in x.dtype, new_state [N, C, K-1] in state.dtype).
    """
    window = torch.cat((state.float(), x.float()[:, :, None]), dim=2)  # [N, C, K]
    out = (window * weight.float()[None]).sum(-1)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype), window[:, :, 1:].to(state.dtype)


# ---- slot-indexed entry points: what the GDN layer calls (fast backends update the cache in place) ---------------

def _gather(x: Tensor, x_cols: Tensor | None) -> Tensor:
    return x if x_cols is None else x.index_select(1, x_cols.long())


@register("causal_conv1d_prefill_", "torch")
def causal_conv1d_prefill_(x: Tensor, weight: Tensor, conv_cache: Tensor, state_slots: Tensor,
                           has_initial_state: Tensor, cu_seqlens: Tensor, activation: str | None = "silu",
                           x_cols: Tensor | None = None, x_cols_run: int = 1,
                           split: tuple[int, int] | None = None) -> Tensor | tuple[Tensor, ...]:
    """causal_conv1d with the states read from and written back to conv_cache [num_slots, C, K-1] at
    state_slots [N] (zeros where has_initial_state [N] is false). x [T, C], or [T, *] with x_cols [C] naming
    the column of x that feeds each channel -> y [T, C]; with split (c1, c2) y as three contiguous tensors
    [T, c1], [T, c2], [T, C - c1 - c2]. x_cols_run: a layout promise about x_cols that fast kernels use
    (qnext.ops.triton_conv1d); the reference gathers either way."""
    slots = state_slots.long()
    y, final = causal_conv1d(_gather(x, x_cols), weight, slot_states(conv_cache, slots, has_initial_state),
                             cu_seqlens, activation)
    conv_cache.index_copy_(0, slots, final.to(conv_cache.dtype))
    if split:
        return tuple(part.contiguous() for part in y.split([split[0], split[1], y.shape[1] - sum(split)], dim=1))
    return y


@register("causal_conv1d_update_", "torch")
def causal_conv1d_update_(x: Tensor, weight: Tensor, conv_cache: Tensor, state_slots: Tensor,
                          has_initial_state: Tensor | None = None, activation: str | None = "silu",
                          x_cols: Tensor | None = None) -> Tensor:
    """causal_conv1d_update in place at the cache slots (has_initial_state None = all true); x [N, C] or
    [N, *] with x_cols -> y [N, C]."""
    slots = state_slots.long()
    y, new = causal_conv1d_update(_gather(x, x_cols), slot_states(conv_cache, slots, has_initial_state), weight,
                                  activation)
    conv_cache.index_copy_(0, slots, new.to(conv_cache.dtype))
    return y


@register("linear_pair_conv_update_", "torch")
def linear_pair_conv_update_(x: Tensor, w1, w2, conv_weight: Tensor, conv_cache: Tensor, state_slots: Tensor,
                             has_initial_state: Tensor | None, x_cols: Tensor,
                             x_chans: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The GDN layer's decode input: (y1, y2) = linear_pair(x, w1, w2) (W fp8 or plain), then
    causal_conv1d_update_ of y1's columns x_cols (x_chans, their inverse map, serves the fused CUDA kernel) ->
    (y1, y2, conv output [N, C])."""
    y1, y2 = linear_pair(x, w1, w2)
    return y1, y2, causal_conv1d_update_(y1, conv_weight, conv_cache, state_slots, has_initial_state, x_cols=x_cols)
