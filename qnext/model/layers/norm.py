"""Norm modules of Qwen3-Next; the math is the "rmsnorm" / "gated_rmsnorm" ops (qnext/ops/norm.py).

RMSNorm (every norm except the GDN output norm) is zero-centred, scale 1 + w; called with a residual it also does
the residual add: norm(x, residual) -> (y, x + residual). GatedRMSNorm (GDN output, per value head) scales by w and
gates with silu(z).
"""

from __future__ import annotations

import torch
from torch import nn

from qnext.model.layers.linear import empty_param
from qnext.ops.registry import get_op


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device=None, ops_backend: str = "auto"):
        super().__init__()
        self.eps, self.ops_backend = eps, ops_backend
        self.weight = empty_param(dim, dtype=dtype, device=device)  # checkpoint stores w, the scale is 1 + w

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., dim] -> y; with residual (like x): (y, x + residual)."""
        return get_op("rmsnorm", self.ops_backend, x.device)(x, self.weight, self.eps, residual)

    def with_rope(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H, dim] -> the norm, then the rotary embedding rope = (cos, sin) [T, R/2], in one op."""
        return get_op("rmsnorm_rope", self.ops_backend, x.device)(x, self.weight, self.eps, *rope)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device=None, ops_backend: str = "auto"):
        super().__init__()
        self.eps, self.ops_backend = eps, ops_backend
        self.weight = empty_param(dim, dtype=dtype, device=device)  # plain scale, initialised to ones

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # x, z: [..., dim], one shape
        return get_op("gated_rmsnorm", self.ops_backend, x.device)(x, z, self.weight, self.eps)
