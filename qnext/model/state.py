"""Cache and state shapes as pure functions of ModelConfig (the memory planner needs no GPU).

Per attention layer: paged K and V, each [num_blocks, block_size, num_kv_heads, head_dim] in the model dtype (or
float8_e4m3fn with kv_cache_dtype fp8). Per GDN layer and state slot: the conv window [conv_dim, K-1] in the model
dtype and the recurrent state [Hv, Dk, Dv], float32 by default (the recurrence accumulates over the whole sequence;
ssm_state_dtype bfloat16 stores it rounded after every step, as vLLM's default does for this model, half the bytes).
"""

from __future__ import annotations

import torch

from qnext.config import ModelConfig

SSM_STATE_DTYPE = torch.float32


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16 or "bfloat16" / "bf16" / "torch.bfloat16" -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def dtype_bytes(dtype: torch.dtype | str) -> int:
    return torch.empty((), dtype=as_dtype(dtype)).element_size()


def kv_cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
    """Shape of K (and of V) for one attention layer."""
    return (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)


def conv_state_shape(cfg: ModelConfig, num_slots: int) -> tuple[int, int, int]:
    """Shape of the conv window of one GDN layer: the last K-1 conv inputs of each slot."""
    return (num_slots, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1)


def ssm_state_shape(cfg: ModelConfig, num_slots: int) -> tuple[int, int, int, int]:
    """Shape of the recurrent state of one GDN layer: S in R^{Dk x Dv} per value head and slot."""
    return (num_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype | str) -> int:
    """K + V bytes one token takes over all attention layers."""
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes(dtype)
    return len(cfg.attention_layer_ids) * per_layer


def state_bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype | str,
                         ssm_dtype: torch.dtype | str = SSM_STATE_DTYPE) -> int:
    """Conv window (model dtype) + recurrent state (float32 by default) of one sequence over all GDN layers.

    Independent of the sequence length.
    """
    conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * dtype_bytes(dtype)
    ssm = (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
           * dtype_bytes(ssm_dtype))
    return len(cfg.linear_layer_ids) * (conv + ssm)
