"""RMSNorms of Qwen3-Next, torch reference (the CPU path and the oracle of qnext.ops.triton_norm).

rmsnorm (every norm except the GDN output norm) is zero-centred: y = x * rsqrt(mean(x^2) + eps) * (1 + w), with an
optional residual: s = x + residual (in x's dtype, as a plain residual add rounds), y = rmsnorm(s), returns (y, s).
That fused form is how the decoder layer carries its residual stream (one op instead of an add and a norm).
gated_rmsnorm (GDN output, per value head) is plain and gated: y = w * x * rsqrt(mean(x^2) + eps) * silu(z).
rmsnorm_rope (attention q/k) is rmsnorm per head followed by the partial rotary embedding (NeoX rotate-half on the
first R dims: dims i and i + R/2 form a pair).
Math in float32, results cast back to x's dtype (after the norm and again after the rotation, as two ops would).
rmsnorm's x may also be a MoeCombine, the sparse MoE block's output not yet summed: the norm forms it first (the
Triton norm in the same launch, one kernel fewer per MoE layer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qnext.ops.moe import sigmoid_gate_add
from qnext.ops.registry import register

Tensor = torch.Tensor


class MoeCombine(NamedTuple):
    """A sparse MoE block's output left for the next norm to form: sigmoid_gate_add(routed, gate, shared) =
    routed (summed over k when [T, k, H]) + sigmoid(gate) * shared; gate [T, 1], shared [T, H]."""
    routed: Tensor
    gate: Tensor
    shared: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.shared.shape

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def value(self) -> Tensor:
        return sigmoid_gate_add(*self)


def _rms(x: Tensor, eps: float) -> Tensor:  # float32 in, float32 out
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@register("rmsnorm", "torch")
def rmsnorm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """x [..., D] (any strides) or a MoeCombine; weight [D]; residual like x or None -> y [..., D], or
    (y, x + residual)."""
    if isinstance(x, MoeCombine):
        x = x.value()
    if residual is not None:
        x = x + residual
    y = (_rms(x.float(), eps) * (1.0 + weight.float())).to(x.dtype)
    return y if residual is None else (y, x)


@register("gated_rmsnorm", "torch")
def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x, z [..., D] of one shape (any strides); weight [D] -> y [..., D] in x.dtype."""
    return (_rms(x.float(), eps) * weight.float() * F.silu(z.float())).to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D]; cos, sin [T, R/2] -> x with dims [0, R) rotated in pairs (i, i + R/2), rest untouched."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half].float(), x[..., half:2 * half].float(), x[..., 2 * half:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1)


@register("rope_cos_sin", "torch")
def rope_cos_sin(positions: Tensor, inv_freq: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """positions [T] int, inv_freq [R/2] float32 -> (cos, sin) of positions x inv_freq, each [T, R/2] float32,
    times scaling (YaRN's attention factor; 1.0 otherwise)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos() * scaling, angles.sin() * scaling


@register("rmsnorm_rope", "torch")
def rmsnorm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D] (any strides); weight [D]; cos, sin [T, R/2] float32 -> rotary(rmsnorm(x)) [T, H, D]."""
    return apply_rotary(rmsnorm(x, weight, eps), cos, sin)


@register("rmsnorm_rope_pair", "torch")
def rmsnorm_rope_pair(q: Tensor, wq: Tensor, k: Tensor, wk: Tensor, eps: float, cos: Tensor,
                      sin: Tensor) -> tuple[Tensor, Tensor]:
    """Attention's two rmsnorm_rope calls, queries and keys (each with its own weight), as one op (one launch on
    CUDA for decode-sized inputs)."""
    return rmsnorm_rope(q, wq, eps, cos, sin), rmsnorm_rope(k, wk, eps, cos, sin)
