"""RMSNorms of Qwen3-Next, computed in float32 and cast back to the input dtype.

RMSNorm (every norm except the GDN output norm) is zero-centred: y = x * rsqrt(mean(x^2) + eps) * (1 + w).
GatedRMSNorm (GDN output, per value head) is plain and gated: y = w * x * rsqrt(mean(x^2) + eps) * silu(z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnext.model.layers.linear import empty_param


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:  # float32 in, float32 out
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)  # checkpoint stores w, the scale is 1 + w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        y = _rms(x.float(), self.eps) * (1.0 + self.weight.float())
        return y.to(x.dtype)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)  # plain scale, initialised to ones

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # x, z: [..., dim]
        y = _rms(x.float(), self.eps) * self.weight.float() * F.silu(z.float())
        return y.to(x.dtype)
