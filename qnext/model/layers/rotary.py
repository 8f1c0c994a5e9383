"""Partial rotary embedding (NeoX rotate-half on the first rotary_dim dims of each head), with YaRN / linear scaling.

inv_freq_j = theta^(-2j/rotary_dim), j < rotary_dim/2; dims i and i + rotary_dim/2 form a rotated pair.
Angles and the rotation are computed in float32. No buffers: the module builds nothing on the model's device
at construction (so device="meta" works) and keeps a per-device copy of inv_freq made on first use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qnext.config import ModelConfig
from qnext.ops.registry import get_op


def _yarn_inv_freq(base: float, dim: int, s: dict, max_pos: int, orig_max: int) -> tuple[torch.Tensor, float]:
    factor = s.get("factor") or max_pos / orig_max
    freq = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated, interpolated = 1.0 / freq, 1.0 / (factor * freq)

    def dim_of(rotations: float) -> float:  # rotary dim index whose wavelength makes `rotations` turns in orig_max
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # 0 below `low` (high-frequency dims keep their frequency), 1 above `high` (low-frequency dims interpolate)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, float(attention_factor)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] float32 on CPU, scale applied to cos and sin)."""
    dim, base, s = cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "yarn":
        orig_max = (s.get("original_max_position_embeddings") or cfg.raw.get("original_max_position_embeddings")
                    or cfg.max_position_embeddings)
        return _yarn_inv_freq(base, dim, s, cfg.max_position_embeddings, int(orig_max))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if kind == "linear":
        inv_freq = inv_freq / float(s["factor"])
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, ops_backend: str = "auto"):
        super().__init__()
        self.rotary_dim, self.ops_backend = cfg.rotary_dim, ops_backend
        self._inv_freq_cpu, self.attention_scaling = rope_inv_freq(cfg)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> cos, sin each [T, rotary_dim/2] float32."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq[positions.device] = self._inv_freq_cpu.to(positions.device)
        return get_op("rope_cos_sin", self.ops_backend, positions.device)(positions, inv_freq, self.attention_scaling)

