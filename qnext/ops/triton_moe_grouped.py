"""Fused MoE, grouped path (decode batches): one program per (used expert, BN rows) multiplies that expert's weight
tile by every pair that picked it, so each used expert's weights are read once per call however many tokens chose
it (the GEMV path reads them once per pair: at 32 tokens x top-10, 320 reads of ~240 distinct experts).

Why not the sorted path: its moe_align is ~10 torch launches (counts, cumsum, argsort, scatter, searchsorted) and its
grid has a block per BM pairs plus one per expert. Here one single-program kernel groups the pairs: it sorts the
keys expert * PB + pair (tl.sort, P <= a few thousand) and writes, per slot s in expert order, the expert
slot_e[s], its pair count slot_cnt[s] and its pairs slot_pairs[s, :cnt] (increasing), plus the slot count. The two
grouped kernels then run on a grid of min(E, P) slots (programs past the slot count return at once), looping over
an expert's pairs in chunks of BM = 16 rows (the smallest tl.dot) with the sorted path's expert tile
(_expert_tile: bf16, fp8 block or int4 group weights). gate_up writes h [P, I] by pair, down writes
y [P, H] = tw * W_down h by pair; the sum over the k experts is the caller's (reduce) or sigmoid_gate_add's. Three
launches, static shapes, no host sync: CUDA-graph safe. Deterministic: a row of tl.dot does not depend on the
other rows, and the k-sum runs in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.triton_moe_sorted import _expert_tile, tile_cfg
from qnext.ops.triton_moe_weights import BF16, FP8, INT4, KernelWeight

Tensor = torch.Tensor

# Tiles per weight kind: gate_up (bn, warps, stages), down (bn2, warps2, stages2); bk as in the sorted path.
# Overridable per call through `config`; timed by scripts/gpu_check.py (H100: int4 bn 64 over 32 by 2-5% at 32-64
# tokens; BN 16 is 2.5x slower; 2 stages lose ~10%. H200 with the inline-PTX dequant: int4 bn2 128 over 64 by 3-4%
# at 32-64 tokens, equal at 8).
GROUPED_DEFAULTS = {
    BF16: dict(bk=64, bn=32, warps=4, stages=3, bn2=64, warps2=4, stages2=3),
    FP8: dict(bk=128, bn=32, warps=4, stages=3, bn2=64, warps2=4, stages2=3),
    INT4: dict(bk=None, bn=64, warps=4, stages=3, bn2=128, warps2=4, stages2=3),
}
BM = 16
# The grouping kernel sorts all P keys in one program.
GROUPED_MAX_PAIRS = 4096


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _group_pairs_kernel(ids_ptr, keys_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, used_ptr, P, MAXC,
                        PB: tl.constexpr, PDL: tl.constexpr = False):
    """One program; ids [P] = expert of each pair. keys [PB] int32 is scratch (the sorted keys, re-read shifted)."""
    pdl_wait_then_release(PDL)
    offs = tl.arange(0, PB)
    valid = offs < P
    e = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int32)
    sk = tl.sort(tl.where(valid, e * PB + offs, 2147483647))
    tl.store(keys_ptr + offs, sk)
    tl.debug_barrier()                                  # the whole sorted row is in memory before the shifted reads
    es = sk // PB
    prev_e = tl.load(keys_ptr + offs - 1, mask=offs > 0, other=0) // PB
    next_e = tl.load(keys_ptr + offs + 1, mask=offs + 1 < P, other=0) // PB
    first = valid & ((offs == 0) | (es != prev_e))
    last = valid & ((offs == P - 1) | (es != next_e))
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    rank = offs - tl.associative_scan(tl.where(first, offs, 0), 0, _max_combine)   # position within the expert
    tl.store(slot_pairs_ptr + slot * MAXC + rank, sk % PB, mask=valid)
    tl.store(slot_e_ptr + slot, es, mask=first)
    tl.store(slot_cnt_ptr + slot, rank + 1, mask=last)
    tl.store(used_ptr, tl.sum(first.to(tl.int32), 0))


@triton.jit
def _moe_grouped_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, used_ptr, tw_ptr,
    N, K, TOPK, MAXC,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    KIND: tl.constexpr, GATE_UP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """grid (slots, cdiv(N, BN)): slot s's expert times its pairs, BM at a time.
    GATE_UP: a = x by token (pair // TOPK), out = h [P, N] by pair, silu(gate) * up (gate rows [0, N), up [N, 2N)).
    else:    a = h by pair, out = y [P, N] by pair, times the router weight tw[pair]."""
    pdl_wait_then_release(PDL)
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    if s >= tl.load(used_ptr):
        return
    e = tl.load(slot_e_ptr + s).to(tl.int64)
    cnt = tl.load(slot_cnt_ptr + s)
    rows = pid_n * BN + tl.arange(0, BN)
    nmask = rows < N
    wb = w_ptr + e * stride_we
    sb = s_ptr + e * stride_se
    for r0 in range(0, cnt, BM):
        r = r0 + tl.arange(0, BM)
        mvalid = r < cnt
        pair = tl.load(slot_pairs_ptr + s * MAXC + r, mask=mvalid, other=0).to(tl.int64)
        if GATE_UP:
            arow = pair // TOPK
        else:
            arow = pair
        acc, acc2 = _expert_tile(a_ptr + arow[:, None] * stride_am, mvalid, wb, sb, rows, nmask, pid_n, N, K,
                                 stride_wn, stride_sn, KIND, GATE_UP, BM, BN, BK)
        omask = mvalid[:, None] & nmask[None, :]
        if GATE_UP:
            h = acc * tl.sigmoid(acc) * acc2
            tl.store(out_ptr + pair[:, None] * stride_om + rows[None, :], h.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tw = tl.load(tw_ptr + pair, mask=mvalid, other=0.0).to(tl.float32)
            tl.store(out_ptr + pair[:, None] * stride_om + rows[None, :],
                     (acc * tw[:, None]).to(out_ptr.dtype.element_ty), mask=omask)


def group_pairs(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """topk_ids [M, k] -> (slot_e [S], slot_cnt [S], slot_pairs [S, P], used [1]) int32 with S = min(E, P): the
    used experts in increasing order, how many pairs picked each, those pairs (p = token * k + slot, increasing),
    and how many slots are used. Entries past `used` (and past a slot's count) are unwritten."""
    p = topk_ids.numel()
    if p > GROUPED_MAX_PAIRS:
        raise ValueError(f"the grouped MoE path takes at most {GROUPED_MAX_PAIRS} pairs, got {p}")
    dev = topk_ids.device
    slots = min(num_experts, p)
    pb = triton.next_power_of_2(p)
    ids = topk_ids.reshape(-1)
    slot_e = torch.empty(slots, dtype=torch.int32, device=dev)
    slot_cnt = torch.empty(slots, dtype=torch.int32, device=dev)
    slot_pairs = torch.empty(slots, p, dtype=torch.int32, device=dev)
    used = torch.empty(1, dtype=torch.int32, device=dev)
    keys = torch.empty(pb, dtype=torch.int32, device=dev)
    _group_pairs_kernel[(1,)](ids, keys, slot_e, slot_cnt, slot_pairs, used, p, p, PB=pb,
                              num_warps=4 if pb <= 1024 else 8, **pdl_launch())
    return slot_e, slot_cnt, slot_pairs, used


def moe_grouped(x: Tensor, w13: KernelWeight, w2: KernelWeight, topk_weights: Tensor, topk_ids: Tensor,
                config: dict | None = None, reduce: bool = True) -> Tensor:
    """Decode-batch path; x [M, H] -> [M, H] (or [M, k, H] unsummed when not reduce). See the module docstring."""
    m, top_k = topk_ids.shape
    p, inter, hidden = m * top_k, w2.k, w2.n
    cfg = tile_cfg(w13, config, GROUPED_DEFAULTS)
    slot_e, slot_cnt, slot_pairs, used = group_pairs(topk_ids, w13.data.shape[0])
    slots, maxc = slot_pairs.shape
    tw = topk_weights.reshape(-1).contiguous()
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    _moe_grouped_kernel[(slots, triton.cdiv(inter, cfg["bn"]))](
        x, w13.data, w13.scale, h, slot_e, slot_cnt, slot_pairs, used, tw,
        inter, w13.k, top_k, maxc,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        KIND=w13.kind, GATE_UP=True, BM=BM, BN=cfg["bn"], BK=cfg["bk"], num_warps=cfg["warps"],
        num_stages=cfg["stages"], **pdl_launch())
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    _moe_grouped_kernel[(slots, triton.cdiv(hidden, cfg["bn2"]))](
        h, w2.data, w2.scale, y, slot_e, slot_cnt, slot_pairs, used, tw,
        hidden, w2.k, top_k, maxc,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), y.stride(0),
        KIND=w2.kind, GATE_UP=False, BM=BM, BN=cfg["bn2"], BK=cfg["bk"], num_warps=cfg["warps2"],
        num_stages=cfg["stages2"], **pdl_launch())
    return y.view(m, top_k, hidden).sum(dim=1) if reduce else y.view(m, top_k, hidden)
