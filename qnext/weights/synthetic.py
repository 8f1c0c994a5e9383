"""Random weights of realistic scale, made directly where they live (no disk), for benchmarks and tests.

Each tensor's values depend on (seed, tensor name, shape, device type), never on the order tensors are made in.
The checkpoint writer (per-expert names, CPU) and in-place filling of a model (fused names, any device) share rules:
- matrices and embeddings: N(0, 0.02) (HF initializer_range)
- zero-centred RMSNorm weights (layer norms, q/k norms, final and MTP norms): N(0, 0.02), i.e. scale ~ 1 + w
- GDN output norm (plain, y = w * x_hat * silu(z)): N(1, 0.02)
- conv1d [C, 1, K]: N(0, 1/sqrt(K))
- A_log: log U(1, 16) (decay rates exp(A_log) as HF initialises them, away from 0)
- dt_bias: softplus^-1(dt), dt log-uniform in [1e-3, 1e-1] (the Mamba time-step initialisation)
Quantized parameters are made in their resident format (no full-precision copy), with the same N(0, 0.02) scale:
- FP8 weights (float8_e4m3fn): N(0, 1) values; their `*_scale_inv`: 0.02
- int4 packed weights (uint8): both nibbles uniform codes 1..15 (q - 8 in -7..7, mean 0, std 4.32);
  their `*_scale`: 0.02 / 4.32
"""

from __future__ import annotations

import math
import zlib

import torch

from qnext.config import ModelConfig
from qnext.ops.quant import FP8_DTYPE
from qnext.weights.name_map import expected_parameters


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


INT4_CODE_STD = math.sqrt((15 ** 2 - 1) / 12)  # uniform on -7..7
_CHUNK_BYTES = 1 << 28                           # bounds the temporaries of the quantized fills


def _row_chunks(t: torch.Tensor) -> list[torch.Tensor]:
    flat = t.view(-1, t.shape[-1]) if t.dim() > 1 else t.view(1, -1)
    rows = max(1, _CHUNK_BYTES // max(1, flat.shape[1] * 2))
    return list(flat.split(rows))


def _fill_fp8(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    for c in _row_chunks(t):
        c.copy_(torch.randn(c.shape, generator=g, device=c.device, dtype=torch.bfloat16))
    return t


def _fill_int4(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    for c in _row_chunks(t):
        high = torch.empty_like(c).random_(1, 16, generator=g).bitwise_left_shift_(4)
        c.random_(1, 16, generator=g).bitwise_or_(high)
    return t


@torch.no_grad()
def fill_(name: str, t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Fill `t` in place with the synthetic values of tensor `name` (see module doc)."""
    g = _generator(seed, name, t.device)
    if t.dtype == FP8_DTYPE:
        return _fill_fp8(t, g)
    if t.dtype == torch.uint8:
        return _fill_int4(t, g)
    if name.endswith("_scale_inv"):
        return t.fill_(0.02)
    if name.endswith("_scale"):
        return t.fill_(0.02 / INT4_CODE_STD)
    if name.endswith("A_log"):
        return t.uniform_(1.0, 16.0, generator=g).log_()
    if name.endswith("dt_bias"):
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.empty(t.shape, dtype=torch.float32, device=t.device).uniform_(lo, hi, generator=g).exp_()
        return t.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    if name.endswith("linear_attn.norm.weight"):
        return t.normal_(1.0, 0.02, generator=g)
    if t.dim() == 1 and "norm" in name:
        return t.normal_(0.0, 0.02, generator=g)
    if name.endswith("conv1d.weight"):
        return t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=g)
    return t.normal_(0.0, 0.02, generator=g)


def synthetic_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu",
                     seed: int = 0) -> torch.Tensor:
    return fill_(name, torch.empty(shape, dtype=dtype, device=device), seed)


@torch.no_grad()
def fill_synthetic_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter of `model` synthetic values in place, on its own device."""
    for name, p in model.named_parameters():
        fill_(name, p.data, seed)
    return model


class ParameterHolder(torch.nn.Module):
    """A module with exactly the parameters `expected_parameters(cfg)` names (no forward): for loading or
    writing weights without the model, e.g. in tests and conversion tools."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        for name, shape in expected_parameters(cfg).items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                                               requires_grad=False))
