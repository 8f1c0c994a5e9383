"""Gated full attention: q_norm/k_norm per head, partial RoPE, GQA over the paged KV cache, sigmoid output gate.

q_proj rows are per head [query (D) | gate (D)]; out = o_proj(attn * sigmoid(gate)).
"""

from __future__ import annotations

import torch
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.linear import QuantScheme, make_linear
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

    def forward(self, x: torch.Tensor, batch, cache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, hidden]; rope = (cos, sin) [T, rotary_dim/2] -> [T, hidden]."""
        t, d = x.shape[0], self.head_dim
        q, gate = self.q_proj(x).view(t, self.num_heads, 2 * d).split(d, dim=-1)     # [T, Hq, D] each
        q = self.q_norm.with_rope(q, rope)
        k = self.k_norm.with_rope(self.k_proj(x).view(t, self.num_kv_heads, d), rope)
        v = self.v_proj(x).view(t, self.num_kv_heads, d)
        k_cache, v_cache = cache.kv[self.layer_id]
        attn = get_op("paged_attention", self.ops_backend, x.device)(
            q, k, v, k_cache, v_cache, slot_mapping=batch.slot_mapping, block_tables=batch.block_tables,
            seq_lens=batch.seq_lens, query_lens=batch.query_lens, context_lens=batch.context_lens,
            scale=self.scale)                                                      # [T, Hq, D]
        out = attn.reshape(t, -1) * torch.sigmoid(gate.reshape(t, -1))
        return self.o_proj(out)
