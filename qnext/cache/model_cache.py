"""ModelCache: the cache tensors of one model, allocated once; layers index them by their own layer id.

Shapes come from qnext.model.state. Everything is zero-filled so that never-written pages and slots are finite
(reference kernels may read padding before masking it out).
"""

from __future__ import annotations

import torch

from qnext.config import ModelConfig
from qnext.model.state import (SSM_STATE_DTYPE, as_dtype, conv_state_shape, kv_cache_shape,
                               kv_bytes_per_token, ssm_state_shape, state_bytes_per_slot)

Tensor = torch.Tensor


class ModelCache:
    """dtype: the model's (conv windows; K/V unless kv_dtype); kv_dtype: K/V pages (e.g. float8_e4m3fn);
    ssm_dtype: the GDN recurrent states (float32 unless asked; the kernels compute in float32 either way)."""

    def __init__(self, cfg: ModelConfig, *, num_blocks: int, block_size: int, num_slots: int,
                 dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu",
                 kv_dtype: torch.dtype | str | None = None, ssm_dtype: torch.dtype | str = SSM_STATE_DTYPE):
        dtype = as_dtype(dtype)
        kv_dtype, ssm_dtype = as_dtype(kv_dtype or dtype), as_dtype(ssm_dtype)
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self.dtype, self.kv_dtype, self.ssm_dtype, self.device = dtype, kv_dtype, ssm_dtype, torch.device(device)
        self.nbytes = (num_blocks * block_size * kv_bytes_per_token(cfg, kv_dtype)
                       + num_slots * state_bytes_per_slot(cfg, dtype, ssm_dtype))
        kv_shape = kv_cache_shape(cfg, num_blocks, block_size)
        # attention layer id -> K, V each [num_blocks, block_size, num_kv_heads, head_dim], kv_dtype
        self.kv: dict[int, tuple[Tensor, Tensor]] = {
            i: (torch.zeros(kv_shape, dtype=kv_dtype, device=device),
                torch.zeros(kv_shape, dtype=kv_dtype, device=device))
            for i in cfg.attention_layer_ids}
        # GDN layer id -> [num_slots, conv_dim, K-1], model dtype
        self.conv: dict[int, Tensor] = {
            i: torch.zeros(conv_state_shape(cfg, num_slots), dtype=dtype, device=device) for i in cfg.linear_layer_ids}
        # GDN layer id -> [num_slots, Hv, Dk, Dv], ssm_dtype
        self.ssm: dict[int, Tensor] = {
            i: torch.zeros(ssm_state_shape(cfg, num_slots), dtype=ssm_dtype, device=device)
            for i in cfg.linear_layer_ids}

    def copy_state(self, src_slots: Tensor | list[int], dst_slots: Tensor | list[int]) -> None:
        """GDN conv + recurrent state of src_slots -> dst_slots, every layer (prefix-cache snapshots, forks)."""
        src = torch.as_tensor(src_slots, dtype=torch.int64, device=self.device)
        dst = torch.as_tensor(dst_slots, dtype=torch.int64, device=self.device)
        for t in (*self.conv.values(), *self.ssm.values()):
            t.index_copy_(0, dst, t.index_select(0, src))

    def zero_state(self, slots: Tensor | list[int]) -> None:
        idx = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
        for t in (*self.conv.values(), *self.ssm.values()):
            t.index_fill_(0, idx, 0)
