"""Fused MoE for the routed experts (Triton): gate_up -> silu(gate) * up -> down, weighted by the router.

Weights (any of the three formats in qnext.ops.quant, the same format for both):
    w13 [E, 2I, H] (gate rows first, as transformers fuses them), w2 [E, H, I]
    bf16/fp16 tensors | Fp8BlockWeight (e4m3 + 128x128 scale_inv) | Int4GroupWeight (packed nibbles + bf16 scales,
    stored in rows or in tiles of a few rows; every int4 kernel reads both, see triton_moe_weights.py)
Routing: topk_ids [M, k] (int32/int64), topk_weights [M, k] float32 (already renormalised).
Reference: qnext.ops.quant.moe_forward_ref (float32 over dequantized weights).
Files: this one (fused_moe, the path choice), triton_moe_gemv.py, triton_moe_grouped.py, triton_moe_sorted.py,
triton_moe_weights.py (the kernel view of a weight and the int4 dequant all paths use).

Three paths, chosen by the number of (token, expert) pairs P = M * k (see GEMV_MAX_PAIRS; measured on H100):
* "gemv" (decode): no sorting, no torch bookkeeping, so it sits in a CUDA graph as 2-3 launches.
  - split mode (P <= SPLIT_MAX_PAIRS, i.e. batch <= 3 at top-10; latency bound): kernel 1 gives each program whole
    rows (4 rows x all of K) of one pair's gate and up, writing h = silu(g) * u [P, I]; kernel 2 runs one program
    per (pair, 16 rows of H) writing tw * W_down h [P, H]; a sum over the k experts finishes. No program loops.
  - otherwise kernel 1 streams BN-row blocks of (pair, expert) over K, kernel 2 runs one program per (token, BN rows)
    looping over its k experts, so the router-weighted sum stays in registers (deterministic, no atomics).
  bf16, fp8 outside the split mode (and int4 with config mma=False) on CUDA cores keep a [BN, NG] float32
  accumulator (each step's tile summed over its GS columns), weights dequantized in registers; int4 and fp8's split
  mode run on tensor cores instead (triton_moe_gemv_mma.py: weights as the MMA's A operand with K folded into its
  16 columns; same two modes), fewer instructions per weight byte. In the split mode the down kernel loads its
  expert's weights before the PDL wait (the ids were written two kernels back).
* "grouped" (decode batches, triton_moe_grouped.py): one kernel groups the pairs by expert (a sort in one
  program), then one program per (used expert, BN rows) multiplies the expert's tile by all of its pairs (16-row
  tl.dot chunks), so each used expert is read once per call; 3 launches, CUDA-graph safe.
* "sorted" (prefill): pairs are grouped by expert and padded to BM rows (moe_align, torch ops, no host sync); a
  grouped GEMM with tl.dot runs per (BM block, BN block) of each expert. gate_up writes h in sorted order, down
  multiplies by the router weight and writes y [P, H] by pair; y.view(M, k, H).sum(1) finishes.
  fp8 tiles are converted to bf16 and the 128x128 block scale multiplies the tile's partial product (BK = 128); int4
  tiles (BK = group) become exact q - 8 in bf16 through a bit trick (no int->float converts), the two nibble halves
  of the group go through two dots, and the group scale multiplies the partial product.
"""

from __future__ import annotations

import torch

from qnext.ops.quant import Fp8BlockWeight, Int4GroupWeight, QuantWeight
from qnext.ops.triton_moe_gemv import moe_gemv
from qnext.ops.triton_moe_grouped import moe_grouped
from qnext.ops.triton_moe_sorted import moe_sorted
from qnext.ops.triton_moe_weights import BF16, FP8, INT4, kernel_view

Tensor = torch.Tensor

# auto's choice by the number of (token, expert) pairs P (H100, scripts/gpu_check.py, docs/perf-notes.md): GEMV up to
# GEMV_MAX_PAIRS (bf16 GEMV streams at ~100% of bandwidth up to 32 tokens; for fp8/int4 only the latency-bound split
# mode at batch <= 3 beats grouping), then the grouped path up to GROUPED_AUTO_MAX_PAIRS (int4 at 32 / 64 tokens:
# 243 / 367 us against GEMV 310 / 606 and sorted 315 / 433; fp8 310 / 472 against 386 / 541 sorted), then sorted.
GEMV_MAX_PAIRS = {BF16: 320, FP8: 32, INT4: 32}
GROUPED_AUTO_MAX_PAIRS = {BF16: 0, FP8: 1024, INT4: 1024}


def fused_moe(x: Tensor, w13: QuantWeight, w2: QuantWeight, topk_weights: Tensor, topk_ids: Tensor, *,
              path: str = "auto", config: dict | None = None, reduce: bool = True) -> Tensor:
    """Routed experts. x [M, H] bf16/fp16; w13 [E, 2I, H], w2 [E, H, I] (bf16 | Fp8BlockWeight | Int4GroupWeight,
    both the same format); topk_weights [M, k] float32; topk_ids [M, k] int -> [M, H] in x.dtype. With
    reduce=False the paths that end in a sum over the k experts return [M, k, H] instead (the caller's
    sigmoid_gate_add sums them in its pass), others still [M, H].
    path: "auto" (by the pair count, see GEMV_MAX_PAIRS), "gemv", "grouped" or "sorted"."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused_moe takes bf16/fp16 activations, got {x.dtype}")
    a, b = kernel_view(w13), kernel_view(w2)
    if a.kind != b.kind or a.n != 2 * b.k or a.k != b.n or a.k != x.shape[1]:
        raise ValueError(f"MoE weight shapes/formats disagree: w13 {a.n}x{a.k} ({a.kind}), w2 {b.n}x{b.k} ({b.kind}),"
                         f" x {tuple(x.shape)}")
    if a.kind == BF16 and a.data.dtype != x.dtype:
        x = x.to(a.data.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if topk_ids.numel() == 0:
        return torch.zeros_like(x)
    if path == "auto":
        p = topk_ids.numel()
        grouped_ok = p <= GROUPED_AUTO_MAX_PAIRS[a.kind] and a.n % 32 == 0 and b.n % 16 == 0
        path = "gemv" if p <= GEMV_MAX_PAIRS[a.kind] else "grouped" if grouped_ok else "sorted"
    if path == "gemv":
        return moe_gemv(x, a, b, topk_weights, topk_ids, config, reduce)
    if path == "sorted":
        return moe_sorted(x, a, b, topk_weights, topk_ids, config, reduce)
    if path == "grouped":
        return moe_grouped(x, a, b, topk_weights, topk_ids, config, reduce)
    raise ValueError(f"unknown MoE path {path!r} (auto, gemv, grouped, sorted)")


def weight_bytes_touched(w13: QuantWeight, w2: QuantWeight, topk_ids: Tensor) -> int:
    """Bytes of expert weights (with scales) the routed tokens need: the HBM floor of one MoE call."""
    experts = int(torch.unique(topk_ids).numel())
    total = sum(_nbytes(w) for w in (w13, w2))
    return total * experts // _num_experts(w13)


def _nbytes(w: QuantWeight) -> int:
    return w.nbytes if isinstance(w, (Fp8BlockWeight, Int4GroupWeight)) else w.numel() * w.element_size()


def _num_experts(w: QuantWeight) -> int:
    return (w.w if isinstance(w, Fp8BlockWeight) else w.qweight if isinstance(w, Int4GroupWeight) else w).shape[0]

