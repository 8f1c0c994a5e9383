"""Feed-forward blocks: dense SwiGLU MLP and the sparse MoE block (routed experts + gated shared expert).

MoE: p = softmax(router logits) in float32, top-k, renormalised when norm_topk_prob;
y = sum_e p_e * down_e(silu(gate_e x) * up_e x) + sigmoid(x . w_sg) * shared(x).
Routed experts are fused as in transformers: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I],
resident as plain tensors, FP8 blocks (+ `<name>_scale_inv` [E, ceil(N/128), ceil(K/128)] float32) or int4 groups
(packed uint8 [E, N, K/2] + `<name>_scale` [E, N, K/group] bf16, tiled in place for the GPU kernels by an engine
that batches; layouts in qnext.ops.quant). The expert math is
the "fused_moe" op: Triton (GEMV for decode, grouped GEMM for prefill; no host sync) on CUDA, torch reference on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.linear import (Linear, QuantScheme, cdiv, empty_param, make_linear, project_pair,
                                      split_stacked, stack_projections)
from qnext.model.side_stream import SideBranch
from qnext.ops.norm import MoeCombine
from qnext.ops.quant import (FP8_BLOCK, FP8_DTYPE, INT4_TILE_ROWS, Fp8BlockWeight, Int4GroupWeight, QuantWeight,
                             tile_int4)
from qnext.ops.registry import get_op, resolve_backend

_PLAIN = QuantScheme()


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, *, dtype: torch.dtype, device=None, quant: str | None = None,
                 ops_backend: str = "auto"):
        super().__init__()
        self.ops_backend = ops_backend
        kw = dict(dtype=dtype, device=device, quant=quant, ops_backend=ops_backend)
        self.gate_proj = make_linear(hidden, intermediate, **kw)
        self.up_proj = make_linear(hidden, intermediate, **kw)
        self.down_proj = make_linear(intermediate, hidden, **kw)
        object.__setattr__(self, "gate_up", None)   # stack_projections(): not a submodule (see there)

    def stack_projections(self) -> None:
        if self.gate_up is None:     # once: a captured CUDA graph keeps reading the first stacked tensors
            object.__setattr__(self, "gate_up", stack_projections([self.gate_proj, self.up_proj]))

    def forward(self, x: torch.Tensor, side_stream=None, defer_combine: bool = False) -> torch.Tensor:
        # x [T, H]; side_stream and defer_combine unused (one chain, nothing to combine)
        if self.gate_up is None:
            return self.down_proj(get_op("silu_mul", self.ops_backend, x.device)(self.gate_proj(x), self.up_proj(x)))
        return self.down_from(self.gate_up(x))

    def down_from(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The stacked gate_up projection's output [T, 2I] -> down_proj(silu(gate) * up) [T, H] (one op: on CUDA
        the down GEMV forms its input for decode rows)."""
        gate, up = split_stacked(self.gate_up, gate_up)                                 # [T, I] views
        down = self.down_proj
        return get_op("silu_mul_linear", down.ops_backend, gate.device)(gate, up, down.matmul_weight(), down.bias)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype: torch.dtype, device=None,
                 quant: str | None = None, group_size: int = 128, ops_backend: str = "auto"):
        super().__init__()
        self.num_experts, self.quant, self.group_size = num_experts, quant, group_size
        self.ops_backend = ops_backend
        self.tile_rows = 0             # int4 storage: rows until tile_storage()
        for name, (n, k) in (("gate_up_proj", (2 * intermediate, hidden)), ("down_proj", (hidden, intermediate))):
            if quant is None:
                setattr(self, name, empty_param(num_experts, n, k, dtype=dtype, device=device))
            elif quant == "fp8":
                setattr(self, name, empty_param(num_experts, n, k, dtype=FP8_DTYPE, device=device))
                setattr(self, name + "_scale_inv", empty_param(num_experts, cdiv(n, FP8_BLOCK), cdiv(k, FP8_BLOCK),
                                                               dtype=torch.float32, device=device))
            elif quant == "int4":
                if k % group_size:
                    raise ValueError(f"int4 experts: group {group_size} does not divide K={k} of {name}")
                setattr(self, name, empty_param(num_experts, n, k // 2, dtype=torch.uint8, device=device))
                setattr(self, name + "_scale", empty_param(num_experts, n, k // group_size, dtype=torch.bfloat16,
                                                           device=device))
            else:
                raise ValueError(f"unknown expert quantization {quant!r} (fp8, int4)")
        fp8_odd = quant == "fp8" and (hidden % FP8_BLOCK or intermediate % FP8_BLOCK)
        if fp8_odd or dtype not in (torch.bfloat16, torch.float16):
            self.ops_backend = "torch"     # the Triton kernels take 128-multiple fp8 blocks and 16-bit activations

    def quant_weights(self) -> tuple[QuantWeight, QuantWeight]:
        """(w13 [E, 2I, H], w2 [E, H, I]) in the resident format (views, no copies)."""
        if self.quant == "fp8":
            return (Fp8BlockWeight(self.gate_up_proj, self.gate_up_proj_scale_inv),
                    Fp8BlockWeight(self.down_proj, self.down_proj_scale_inv))
        if self.quant == "int4":
            return (Int4GroupWeight(self.gate_up_proj, self.gate_up_proj_scale, self.group_size, self.tile_rows),
                    Int4GroupWeight(self.down_proj, self.down_proj_scale, self.group_size, self.tile_rows))
        return self.gate_up_proj, self.down_proj

    def tile_storage(self) -> None:
        """int4 experts that the Triton kernels serve move to tiled storage in place (qnext.ops.quant, tile_int4:
        the grouped decode MoE reads whole tiles, ~20% faster on the H100; the batch-1 GEMV ~10% slower), a few
        experts at a time so no second copy is held. Once; nothing for other formats, devices or widths."""
        tile_rows = INT4_TILE_ROWS
        if (self.quant != "int4" or self.tile_rows or self.gate_up_proj.shape[1] % (2 * tile_rows)
                or self.down_proj.shape[1] % tile_rows
                or resolve_backend(self.ops_backend, self.gate_up_proj.device) != "triton"):
            return
        for name in ("gate_up_proj", "down_proj"):
            data, scale = getattr(self, name).data, getattr(self, name + "_scale").data
            for e in range(0, self.num_experts, 32):
                tiled = tile_int4(Int4GroupWeight(data[e:e + 32], scale[e:e + 32], self.group_size), tile_rows)
                data[e:e + 32].copy_(tiled.qweight)
                scale[e:e + 32].copy_(tiled.scale)
        self.tile_rows = tile_rows

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                reduce: bool = True) -> torch.Tensor:
        """x [T, H]; topk_ids, topk_weights [T, k] -> [T, H] (reduce=False: possibly [T, k, H] unsummed)."""
        w13, w2 = self.quant_weights()
        return get_op("fused_moe", self.ops_backend, x.device)(x, w13, w2, topk_weights, topk_ids, reduce=reduce)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype, device=None, quant: QuantScheme | None = None,
                 ops_backend: str = "auto"):
        super().__init__()
        q = quant or _PLAIN
        self.ops_backend = ops_backend
        kw = dict(dtype=dtype, device=device)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, ops_backend=ops_backend, **kw)   # router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, quant=q.experts,
                               group_size=q.group_size, ops_backend=ops_backend, **kw)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, quant=q.dense,
                                     ops_backend=ops_backend, **kw)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, ops_backend=ops_backend, **kw)
        object.__setattr__(self, "router_and_shared_gate", None)   # stack_projections(): not a submodule

    def stack_projections(self) -> None:
        if self.shared_expert_gate is not None and self.router_and_shared_gate is None:   # once (see MLP)
            object.__setattr__(self, "router_and_shared_gate",
                               stack_projections([self.gate, self.shared_expert_gate]))

    def forward(self, x: torch.Tensor, side_stream=None, defer_combine: bool = False) -> torch.Tensor | MoeCombine:
        """x [T, H] -> [T, H]. side_stream: the shared expert runs on it, beside the router and routed experts (see
        SideBranch). defer_combine (with a shared expert): return the MoeCombine for the next RMSNorm to form.
        Without a side stream and with the projections stacked (decode graphs from batch 1 below
        SIDE_STREAM_MIN_BATCH) the block is one chain of four launches: shared gate_up + router, shared down +
        routing, the experts' gate_up, their down."""
        shared, stacked = self.shared_expert, self.router_and_shared_gate
        if shared is not None and side_stream is None and stacked is not None and shared.gate_up is not None:
            pair = project_pair(x, shared.gate_up, stacked)
            if pair is not None:
                gate, up = split_stacked(shared.gate_up, pair[0])                       # [T, I] views
                logits, shared_gate = split_stacked(stacked, pair[1])                   # [T, E], [T, 1]
                down = shared.down_proj
                s, ids, weights = get_op("silu_mul_linear_route", self.ops_backend, x.device)(
                    gate, up, down.matmul_weight(), down.bias, logits, self.top_k, self.norm_topk_prob)
                y = self.experts(x, ids, weights, reduce=False)                         # the shared add sums the k
                return self._add_shared(x, y, shared_gate, s, defer_combine)
        s = None
        if shared is not None:
            with SideBranch(side_stream) as side:
                s = shared(x)                                                           # [T, H]
        if stacked is not None:
            logits, shared_gate = split_stacked(stacked, stacked(x))                    # [T, E], [T, 1]
        else:
            logits = self.gate(x)                                                       # [T, E]
            shared_gate = self.shared_expert_gate(x) if shared is not None else None   # [T, 1]
        ids, weights = get_op("moe_route", self.ops_backend, x.device)(logits, self.top_k, self.norm_topk_prob)
        if shared is not None:
            y = self.experts(x, ids, weights, reduce=False)                             # the shared add sums the k
            side.join()
            return self._add_shared(x, y, shared_gate, s, defer_combine)
        return self.experts(x, ids, weights)

    def _add_shared(self, x, y, shared_gate, s, defer_combine: bool) -> torch.Tensor | MoeCombine:
        """The routed experts' output y ([T, H] or unsummed [T, k, H]) plus sigmoid(shared_gate) * s."""
        if defer_combine:
            return MoeCombine(y, shared_gate, s)
        return get_op("sigmoid_gate_add", self.ops_backend, x.device)(y, shared_gate, s)
