"""Gated full attention: q_norm/k_norm per head, partial RoPE, GQA over the paged KV cache, sigmoid output gate.

q_proj rows are per head [query (D) | gate (D)]; out = o_proj(attn * sigmoid(gate)).
"""

from __future__ import annotations

import torch
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.linear import QuantScheme, make_linear, split_stacked, stack_projections
from qnext.model.layers.norm import RMSNorm
from qnext.ops.registry import get_op


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, *, dtype: torch.dtype, device=None,
                 ops_backend: str = "auto", quant: QuantScheme | None = None):
        super().__init__()
        self.layer_id, self.ops_backend = layer_id, ops_backend
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        h, qd, kvd = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        kw = dict(dtype=dtype, device=device)
        dense = dict(kw, quant=quant.dense if quant else None, ops_backend=ops_backend)
        self.q_proj = make_linear(h, 2 * qd, **dense)
        self.k_proj = make_linear(h, kvd, **dense)
        self.v_proj = make_linear(h, kvd, **dense)
        self.o_proj = make_linear(qd, h, **dense)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops_backend=ops_backend, **kw)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops_backend=ops_backend, **kw)
        object.__setattr__(self, "qkv_proj", None)   # stack_projections(): not a submodule (see MLP)

    def stack_projections(self) -> None:
        if self.qkv_proj is None:     # once: a captured CUDA graph keeps reading the first stacked tensors
            object.__setattr__(self, "qkv_proj", stack_projections([self.q_proj, self.k_proj, self.v_proj]))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q_proj, k_proj, v_proj outputs ([T, 2 * Hq * D], [T, Hkv * D] twice; views of one
        stacked projection's output when stacked)."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return tuple(split_stacked(self.qkv_proj, self.qkv_proj(x)))

    def forward(self, x: torch.Tensor, batch, cache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, hidden]; rope = (cos, sin) [T, rotary_dim/2] -> [T, hidden]. The attention op applies the
        sigmoid gate (a strided view of q_proj's output) in its epilogue."""
        t, d = x.shape[0], self.head_dim
        q, k, v = self._qkv(x)
        q, gate = q.view(t, self.num_heads, 2 * d).split(d, dim=-1)                  # [T, Hq, D] each
        q, k = get_op("rmsnorm_rope_pair", self.ops_backend, x.device)(
            q, self.q_norm.weight, k.view(t, self.num_kv_heads, d), self.k_norm.weight, self.q_norm.eps, *rope)
        v = v.view(t, self.num_kv_heads, d)
        k_cache, v_cache = cache.kv[self.layer_id]
        attn = get_op("paged_attention", self.ops_backend, x.device)(
            q, k, v, k_cache, v_cache, slot_mapping=batch.slot_mapping, block_tables=batch.block_tables,
            seq_lens=batch.seq_lens, query_lens=batch.query_lens, context_lens=batch.context_lens,
            scale=self.scale, gate=gate)                                           # [T, Hq, D], gated
        return self.o_proj(attn.reshape(t, -1))
