"""Feed-forward blocks: dense SwiGLU MLP and the sparse MoE block (routed experts + gated shared expert).

MoE: p = softmax(router logits) in float32, top-k, renormalised when norm_topk_prob;
y = sum_e p_e * down_e(silu(gate_e x) * up_e x) + sigmoid(x . w_sg) * shared(x).
Routed experts are fused as in transformers: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.linear import Linear, empty_param


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = Linear(hidden, intermediate, **kw)
        self.up_proj = Linear(hidden, intermediate, **kw)
        self.down_proj = Linear(intermediate, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = empty_param(num_experts, 2 * intermediate, hidden, dtype=dtype, device=device)
        self.down_proj = empty_param(num_experts, hidden, intermediate, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_ids, topk_weights [T, k] -> [T, H]. Reference: tokens grouped by expert, one matmul
        pair per expert that got tokens, accumulated in float32."""
        k = topk_ids.shape[1]
        flat = topk_ids.flatten()
        order = flat.argsort(stable=True)                      # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        weights = topk_weights.flatten().float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            picks = order[start:start + n]
            start += n
            tokens = picks // k
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, tokens, y.float() * weights[picks, None])
        return out.to(x.dtype)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, **kw)                    # router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, **kw)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, **kw)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, **kw)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]
        ids, weights = self.route(x)
        y = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y
