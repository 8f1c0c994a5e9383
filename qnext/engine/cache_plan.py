"""How many KV pages and GDN state slots to allocate, and the max_model_len that follows (no tensors touched).

Sources of the memory budget, first given wins:
  num_kv_blocks            exactly that many pages
  kv_cache_memory_gb       that much for pages + slots
  CUDA                     free memory after the weights, minus (1 - gpu_memory_utilization) of the device and an
                           activation reserve (activation_reserve: grows with the step token budget), minus the slots
  CPU                      CPU_KV_CACHE_GB for pages on top of the slots
Pages are capped at what max_num_seqs sequences of max_model_len tokens could ever use.
With reserve_dummy (CUDA graphs) the cache gets one more page and one more state slot than the pools hand out:
padding rows of a captured decode batch read and write only those (taken from the budget before the split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qnext.cache.block_pool import cdiv
from qnext.config import EngineConfig, ModelConfig
from qnext.model.state import kv_bytes_per_token, state_bytes_per_slot

GiB = 1 << 30
CPU_KV_CACHE_GB = 1.0
# Peak activations of one step grow with its token budget: per token of Qwen3-Coder-Next ~150 KiB at the widest
# point (the MoE's 10 routed rows of 2048 and 512 bf16 values, the GDN projections and fla's per-chunk fp32
# states), an estimate from the shapes; logits and the sampler come on top for the last tokens only. Reserved with
# margin, at least 1 GiB; a profiling run would measure it instead (not done yet).
ACTIVATION_BYTES_PER_TOKEN = 192 << 10


def activation_reserve(max_num_batched_tokens: int) -> int:
    return max(1 * GiB, max_num_batched_tokens * ACTIVATION_BYTES_PER_TOKEN)


# The default step token budget. Never below 8192: a step that is not a decode-graph replay is host bound at ~200 ms
# on the H200 machine whatever it carries (a lone 8K prompt's TTFT was 822 ms in 2048-token chunks, 225 ms in one
# step). 16384 on a GPU of 64 GiB or more: two 8K prompts in one step give the sorted prefill MoE twice the tokens
# per expert (214 against 175 TFLOP/s) and halve the eager steps, so 32 8K prompts arriving at once (a wave of
# serve-8k1k-c32) prefill in ~7.0 s of steps instead of ~8.4 (docs/benchmarks.md, 2026-12-03 sixth session). The
# price is the activation reserve (3 GiB instead of 1.5) and decodes waiting ~0.44 s instead of ~0.24 behind such
# a step; a small card needs that memory for KV pages, so it keeps 8192.
LARGE_GPU_BYTES = 64 * GiB


def default_token_budget(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= LARGE_GPU_BYTES:
        return 16384
    return 8192


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    num_slots: int
    max_model_len: int
    kv_bytes: int
    state_bytes: int
    dummy_page: int | None = None    # page id num_blocks, outside the pool (reserve_dummy)
    dummy_slot: int | None = None    # slot id num_slots, outside the pool (reserve_dummy)

    @property
    def cache_blocks(self) -> int:   # pages the ModelCache holds
        return self.num_blocks + (self.dummy_page is not None)

    @property
    def cache_slots(self) -> int:    # state slots the ModelCache holds
        return self.num_slots + (self.dummy_slot is not None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available (use --device cpu)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def cache_dtypes(ec: EngineConfig, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(K/V page dtype, GDN recurrent state dtype) of a model in `dtype` under ec's kv_cache_dtype and
    ssm_state_dtype."""
    kv = torch.float8_e4m3fn if ec.kv_cache_dtype == "fp8" else dtype
    return kv, getattr(torch, ec.ssm_state_dtype)


def plan_cache(cfg: ModelConfig, ec: EngineConfig, device: torch.device, dtype: torch.dtype,
               reserve_dummy: bool = False) -> CachePlan:
    num_slots = ec.max_num_seqs
    kv_dtype, ssm_dtype = cache_dtypes(ec, dtype)
    block_bytes = max(1, ec.block_size * kv_bytes_per_token(cfg, kv_dtype))
    slot_bytes = (num_slots + reserve_dummy) * state_bytes_per_slot(cfg, dtype, ssm_dtype)
    longest = ec.max_model_len or cfg.max_position_embeddings
    if ec.max_model_len is not None and ec.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {ec.max_model_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")

    if ec.num_kv_blocks is not None:
        num_blocks = ec.num_kv_blocks
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
    else:
        if ec.kv_cache_memory_gb is not None:
            budget, source = ec.kv_cache_memory_gb * GiB - slot_bytes, f"kv_cache_memory_gb={ec.kv_cache_memory_gb}"
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = (free - (1 - ec.gpu_memory_utilization) * total - activation_reserve(ec.max_num_batched_tokens)
                      - slot_bytes)
            source = f"free GPU memory {free / GiB:.1f} GiB at gpu_memory_utilization={ec.gpu_memory_utilization}"
        else:
            budget, source = CPU_KV_CACHE_GB * GiB, f"the CPU default of {CPU_KV_CACHE_GB} GiB"
        cap = cdiv(num_slots * longest, ec.block_size)
        num_blocks = min(int(budget // block_bytes) - reserve_dummy, cap)
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for KV pages with {source}: the GDN state of max_num_seqs={num_slots} sequences "
                f"takes {slot_bytes / GiB:.2f} GiB; lower max_num_seqs or give more kv_cache_memory_gb")

    pool_tokens = num_blocks * ec.block_size
    if ec.max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, pool_tokens)
    else:
        max_model_len = ec.max_model_len
        # a request may hold max_model_len - 1 tokens in the cache (the last sampled one is never fed)
        if cdiv(max_model_len - 1, ec.block_size) > num_blocks:
            raise ValueError(f"max_model_len {max_model_len} needs {cdiv(max_model_len - 1, ec.block_size)} KV "
                             f"pages but the pool has {num_blocks}; raise num_kv_blocks / kv_cache_memory_gb or "
                             f"lower max_model_len")
    dummy_page, dummy_slot = (num_blocks, num_slots) if reserve_dummy else (None, None)
    return CachePlan(num_blocks, num_slots, max_model_len, (num_blocks + reserve_dummy) * block_bytes, slot_bytes,
                     dummy_page, dummy_slot)
