"""Fused MoE, grouped path (decode batches): one program per (used expert, BN rows) multiplies that expert's weight
tile by every pair that picked it, so each used expert's weights are read once per call however many tokens chose
it (the GEMV path reads them once per pair: at 32 tokens x top-10, 320 reads of ~240 distinct experts).

Why not the sorted path: its moe_align is ~10 torch launches (counts, cumsum, argsort, scatter, searchsorted) and its
grid has a block per BM pairs plus one per expert. Here one single-program kernel groups the pairs: it sorts the
keys expert * PB + pair (tl.sort, P <= a few thousand) and cuts each expert's pairs into slots of at most BM = 16
(the smallest tl.dot), writing per slot s in expert order the expert slot_e[s], its pair count slot_cnt[s] and its
pairs slot_pairs[s, :cnt] (increasing), plus the slot count. The two grouped kernels then run on a grid of
min(E, P) + P / BM slots (programs past the slot count return at once), each program one BM x BN tile over all of
K: bf16, fp8 block or int4 group weights, dequantized in registers and fed to tl.dot as its second operand.
gate_up writes h [P, I] by pair, down writes y [P, H] = tw * W_down h by pair; the sum over the k experts is the
caller's (reduce) or the next norm's. Three launches, static shapes, no host sync: CUDA-graph safe. Deterministic:
a row of tl.dot does not depend on the other rows, and the k-sum runs in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.triton_moe_sorted import tile_cfg
from qnext.ops.triton_moe_weights import (BF16, FP8, INT4, KernelWeight, fp8_to, int4_dq, int4_group_offsets,
                                          int4_row_offsets, int4_scale_group_offsets, int4_scale_row_offsets)

Tensor = torch.Tensor

# Tiles per weight kind: gate_up (bn, warps, stages), down (bn2, warps2, stages2); bk as in the sorted path.
# Overridable per call through `config`; timed by scripts/gpu_check.py --only grouped (H100: int4 bn 64 over 32 by
# 2-5% at 32-64 tokens; BN 16 is 2.5x slower; 2 stages lose ~10%. H200: int4 bn2 128 over 64 by 3-4% at 32-64
# tokens; 8 warps 25% slower; a persistent grid running the items' K steps as one loop and swapped MMA operands
# were both slower, see docs/perf-notes.md). int4 over tiled storage (scripts/gpu_grouped_probe.py, H100): 3 stages
# over 4 by 3-5% at 8-64 tokens (over rows the H200 had preferred 4 by 2%); gate_up BN 128 7% slower.
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
def _group_pairs_kernel(ids_ptr, keys_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, used_ptr, P,
                        PB: tl.constexpr, CH: tl.constexpr, PDL: tl.constexpr = False):
    """One program; ids [P] = expert of each pair. keys [PB] int32 is scratch (the sorted keys, re-read shifted).
    An expert's pairs are cut into slots of at most CH pairs (its rank-th pair goes to its (rank // CH)-th slot)."""
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
    first_e = valid & ((offs == 0) | (es != prev_e))
    last_e = valid & ((offs == P - 1) | (es != next_e))
    rank = offs - tl.associative_scan(tl.where(first_e, offs, 0), 0, _max_combine)   # position within the expert
    first = valid & (first_e | (rank % CH == 0))
    last = valid & (last_e | (rank % CH == CH - 1))
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    tl.store(slot_pairs_ptr + slot * CH + rank % CH, sk % PB, mask=valid)
    tl.store(slot_e_ptr + slot, es, mask=first)
    tl.store(slot_cnt_ptr + slot, rank % CH + 1, mask=last)
    tl.store(used_ptr, tl.sum(first.to(tl.int32), 0))


@triton.jit
def _acts(a_rows, mvalid, k0, K, KIND: tl.constexpr, BK: tl.constexpr):
    """One K step's activations of the BM rows a_rows (pointers to row starts; rows not in mvalid read zeros):
    int4: the low-nibble and high-nibble halves of the group, [BM, BK/2] each (k0.. and k0 + BK/2..); others:
    the [BM, BK] tile twice."""
    if KIND == 2:
        ka = k0 + tl.arange(0, BK // 2)
        kb = ka + BK // 2
    else:
        ka = k0 + tl.arange(0, BK)
        kb = ka
    m = mvalid[:, None] & (ka < K)[None, :]
    xa = tl.load(a_rows[:, None] + ka[None, :], mask=m, other=0.0)
    xb = tl.load(a_rows[:, None] + kb[None, :], mask=m, other=0.0)
    return xa, xb


@triton.jit
def _weight_part(xa, xb, wb, sb, r0, k0, K, stride_wn, stride_sn, KIND: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, TR: tl.constexpr):
    """One K step of weight rows r0 + [0, BN) of one expert (wb: its data, sb: its scales; BN divides the rows)
    times the step's activations -> [BM, BN] float32, scaled. int4: BK == group (one scale per row), TR its
    tile_rows; fp8: BK == 128, BN divides 128 (one scale per tile). No row masks: the launcher checks N % BN == 0."""
    rows = r0 + tl.arange(0, BN)
    if KIND == 2:
        g = k0 // BK
        p = tl.load(wb + int4_row_offsets(rows, stride_wn, TR, BK // 2)[None, :]
                    + (int4_group_offsets(g, TR, BK // 2) + tl.arange(0, BK // 2))[:, None])   # [BK/2, BN]
        lo, hi = int4_dq(p, xa.dtype)
        sc = tl.load(sb + int4_scale_row_offsets(rows, stride_sn, TR) + int4_scale_group_offsets(g, TR))
        part = (tl.dot(xa, lo) + tl.dot(xb, hi)) * sc.to(tl.float32)[None, :]
    else:
        ka = k0 + tl.arange(0, BK)
        w = tl.load(wb + rows[None, :] * stride_wn + ka[:, None], mask=(ka < K)[:, None], other=0.0)  # [BK, BN]
        part = tl.dot(xa, fp8_to(w, xa.dtype))
        if KIND == 1:
            part = part * tl.load(sb + (r0 // 128) * stride_sn + k0 // 128)
    return part


@triton.jit
def slot_rows(a_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, s, TOPK, stride_am, GATE_UP: tl.constexpr,
              BM: tl.constexpr):
    """Slot s of group_pairs -> (its expert int64, which of its BM rows hold a pair [BM], the pairs [BM] int64,
    each row's activation pointer [BM]: x by token (pair // TOPK) for gate_up, h by pair for down)."""
    e = tl.load(slot_e_ptr + s).to(tl.int64)
    r = tl.arange(0, BM)
    mvalid = r < tl.load(slot_cnt_ptr + s)
    pair = tl.load(slot_pairs_ptr + s * BM + r, mask=mvalid, other=0).to(tl.int64)
    if GATE_UP:
        a_rows = a_ptr + (pair // TOPK) * stride_am
    else:
        a_rows = a_ptr + pair * stride_am
    return e, mvalid, pair, a_rows


@triton.jit
def _moe_grouped_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, used_ptr, tw_ptr,
    N, K, TOPK,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    KIND: tl.constexpr, GATE_UP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    TR: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """grid (slots, N / BN): slot s's expert, rows [r0, r0 + BN), times its (at most BM) pairs; programs past the
    used slots return at once.
    GATE_UP: a = x by token (pair // TOPK), out = h [P, N] by pair, silu(gate) * up (gate rows [0, N), up [N, 2N)).
    else:    a = h by pair, out = y [P, N] by pair, times the router weight tw[pair]."""
    pdl_wait_then_release(PDL)
    s = tl.program_id(0)
    r0 = tl.program_id(1) * BN
    if s >= tl.load(used_ptr):
        return
    e, mvalid, pair, a_rows = slot_rows(a_ptr, slot_e_ptr, slot_cnt_ptr, slot_pairs_ptr, s, TOPK, stride_am,
                                        GATE_UP, BM)
    wb = w_ptr + e * stride_we
    sb = s_ptr + e * stride_se
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        xa, xb = _acts(a_rows, mvalid, k0, K, KIND, BK)
        acc += _weight_part(xa, xb, wb, sb, r0, k0, K, stride_wn, stride_sn, KIND, BN, BK, TR)
        if GATE_UP:
            acc2 += _weight_part(xa, xb, wb, sb, N + r0, k0, K, stride_wn, stride_sn, KIND, BN, BK, TR)
    optrs = out_ptr + pair[:, None] * stride_om + (r0 + tl.arange(0, BN))[None, :]
    if GATE_UP:
        tl.store(optrs, (acc * tl.sigmoid(acc) * acc2).to(out_ptr.dtype.element_ty), mask=mvalid[:, None])
    else:
        tw = tl.load(tw_ptr + pair, mask=mvalid, other=0.0).to(tl.float32)
        tl.store(optrs, (acc * tw[:, None]).to(out_ptr.dtype.element_ty), mask=mvalid[:, None])


def group_pairs(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """topk_ids [M, k] -> (slot_e [S], slot_cnt [S], slot_pairs [S, BM], used [1]) int32 with S = min(E, P) +
    P // BM: the used experts in increasing order, each expert's pairs (p = token * k + slot, increasing) cut into
    slots of at most BM, slot_e / slot_cnt each slot's expert and pair count, and how many slots are used. Entries
    past `used` (and past a slot's count) are unwritten."""
    p = topk_ids.numel()
    if p > GROUPED_MAX_PAIRS:
        raise ValueError(f"the grouped MoE path takes at most {GROUPED_MAX_PAIRS} pairs, got {p}")
    dev = topk_ids.device
    slots = min(num_experts, p) + p // BM
    pb = triton.next_power_of_2(p)
    ids = topk_ids.reshape(-1)
    slot_e = torch.empty(slots, dtype=torch.int32, device=dev)
    slot_cnt = torch.empty(slots, dtype=torch.int32, device=dev)
    slot_pairs = torch.empty(slots, BM, dtype=torch.int32, device=dev)
    used = torch.empty(1, dtype=torch.int32, device=dev)
    keys = torch.empty(pb, dtype=torch.int32, device=dev)
    _group_pairs_kernel[(1,)](ids, keys, slot_e, slot_cnt, slot_pairs, used, p, PB=pb, CH=BM,
                              num_warps=4 if pb <= 1024 else 8, **pdl_launch())
    return slot_e, slot_cnt, slot_pairs, used


def _launch(a, w: KernelWeight, out, groups, tw, n: int, top_k: int, gate_up: bool, bn: int, bk: int, warps: int,
            stages: int) -> None:
    """One grouped GEMM: out = silu(gate) * up of a's rows (gate_up) or tw * (a's rows times w). The tile's BN
    rows are halved until they divide N (the kernel has no row masks)."""
    slot_e, slot_cnt, slot_pairs, used = groups
    while n % bn and bn > 16:
        bn //= 2
    if n % bn:
        raise ValueError(f"the grouped MoE path needs N % 16 == 0, got N = {n}")
    _moe_grouped_kernel[(slot_e.shape[0], n // bn)](
        a, w.data, w.scale, out, slot_e, slot_cnt, slot_pairs, used, tw, n, w.k, top_k,
        a.stride(0), w.data.stride(0), w.data.stride(1), w.scale.stride(0), w.scale.stride(1), out.stride(0),
        KIND=w.kind, GATE_UP=gate_up, BM=BM, BN=bn, BK=bk, TR=w.tile_rows, num_warps=warps, num_stages=stages,
        **pdl_launch())


def moe_grouped(x: Tensor, w13: KernelWeight, w2: KernelWeight, topk_weights: Tensor, topk_ids: Tensor,
                config: dict | None = None, reduce: bool = True) -> Tensor:
    """Decode-batch path; x [M, H] -> [M, H] (or [M, k, H] unsummed when not reduce). See the module docstring."""
    m, top_k = topk_ids.shape
    p, inter, hidden = m * top_k, w2.k, w2.n
    cfg = tile_cfg(w13, config, GROUPED_DEFAULTS)
    groups = group_pairs(topk_ids, w13.data.shape[0])
    tw = topk_weights.reshape(-1).contiguous()
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, h, groups, tw, inter, top_k, True, cfg["bn"], cfg["bk"], cfg["warps"], cfg["stages"])
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    _launch(h, w2, y, groups, tw, hidden, top_k, False, cfg["bn2"], cfg["bk"], cfg["warps2"], cfg["stages2"])
    return y.view(m, top_k, hidden).sum(dim=1) if reduce else y.view(m, top_k, hidden)
