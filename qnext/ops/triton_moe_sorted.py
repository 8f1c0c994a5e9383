"""Fused MoE, sorted path (prefill, many pairs): pairs grouped by expert and padded to BM rows (moe_align, torch
ops, no host sync), then a grouped GEMM with tl.dot per (BM block, BN block) of each expert. Formats and tile
notes: qnext/ops/triton_moe.py's docstring."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.triton_moe_weights import (BF16, FP8, INT4, KernelWeight, fp8_to, int4_dq, int4_group_offsets,
                                          int4_row_offsets, int4_scale_group_offsets, int4_scale_row_offsets)

Tensor = torch.Tensor

# Grouped-GEMM tiles: gate_up (bn, warps, stages) and down (bn2, warps2, stages2); bm from the tokens per expert
# unless given; bk = 64 (bf16), 128 (fp8 block), group (int4). Chosen without spills (ptxas report) and by
# scripts/gpu_check.py timings; overridable per call through `config`.
SORTED_DEFAULTS = {
    BF16: dict(bk=64, bn=128, warps=4, stages=4, bn2=128, warps2=4, stages2=4),
    # fp8: swapped operands on the down GEMM only: 3.7 vs 4.4 ms at 8K tokens, 2.1 vs 2.6 at 2K (one H100 sweep;
    # gate_up swapped gained nothing)
    FP8: dict(bk=128, bn=64, warps=4, stages=3, bn2=128, warps2=4, stages2=4, swap=False, swap2=True),
    # int4: swapped operands (see _tile_swapped) on both GEMMs, 3.4 vs 4.6 ms at 8K tokens (H100 sweep,
    # scripts/gpu_moe_prefill_sweep.py). dq_pairs: the swapped tiles dequantize two bytes at a time (int4_dq's
    # PAIRS: offline 595 -> 483 instructions per gate_up K step): 4-7% faster at 8K-32K tokens in two H100 sweeps
    # (8K: 2,597-2,622 vs 2,738-2,799 us), bit-equal outputs.
    INT4: dict(bk=None, bn=64, warps=4, stages=3, bn2=128, warps2=4, stages2=4, swap=True, swap2=True,
               dq_pairs=True),
}


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Group (token, expert) pairs by expert, each expert's run padded to a multiple of block_m. Torch ops only,
    no host sync, static output sizes (so it can sit in a CUDA graph).

    topk_ids [M, k] -> sorted_pairs [NB * block_m] int32 (pair index p = token * k + slot; padding = P),
                       block_expert [NB] int32 (expert of each block; num_experts past the last used block),
    with NB = cdiv(P, block_m) + min(E, P), an upper bound on the padded block count.
    """
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    nb = triton.cdiv(p, block_m) + min(num_experts, p)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)                      # pairs grouped by expert
    sorted_e = flat[order]
    rank = torch.arange(p, device=flat.device) - (counts.cumsum(0) - counts)[sorted_e]
    sorted_pairs = torch.full((nb * block_m,), p, dtype=torch.int32, device=flat.device)
    sorted_pairs[starts[sorted_e] + rank] = order.to(torch.int32)
    block_start = torch.arange(nb, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _expert_tile(a_rows, mvalid, wb, sb, rows, nmask, pid_n, N, K, stride_wn, stride_sn,
                 KIND: tl.constexpr, GATE_UP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 TR: tl.constexpr):
    """(acc, acc2) [BM, BN] float32: the BM activation rows a_rows (pointers to row starts; rows not in mvalid read
    zeros) times rows `rows` of one expert's weight (wb: its data, sb: its scales); acc2 = the up rows N + rows
    when GATE_UP (else zeros). fp8: BK == 128, BN divides 128, N % 128 == 0; int4: BK == group, K % BK == 0, TR
    the weight's tile_rows."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    if KIND == 2:
        jj = tl.arange(0, BK // 2)
        for k0 in range(0, K, BK):              # half-split packing: low nibbles k0.., high nibbles k0 + BK/2..
            a_e = tl.load(a_rows + (k0 + jj)[None, :], mask=mvalid[:, None], other=0.0)
            a_o = tl.load(a_rows + (k0 + BK // 2 + jj)[None, :], mask=mvalid[:, None], other=0.0)
            pk = int4_group_offsets(k0 // BK, TR, BK // 2) + jj
            sg = int4_scale_group_offsets(k0 // BK, TR)
            p = tl.load(wb + int4_row_offsets(rows, stride_wn, TR, BK // 2)[None, :] + pk[:, None],
                        mask=nmask[None, :], other=0)
            lo, hi = int4_dq(p, a_e.dtype)
            sc = tl.load(sb + int4_scale_row_offsets(rows, stride_sn, TR) + sg, mask=nmask, other=0)
            acc += (tl.dot(a_e, lo) + tl.dot(a_o, hi)) * sc.to(tl.float32)[None, :]
            if GATE_UP:
                p2 = tl.load(wb + int4_row_offsets(rows + N, stride_wn, TR, BK // 2)[None, :] + pk[:, None],
                             mask=nmask[None, :], other=0)
                lo2, hi2 = int4_dq(p2, a_e.dtype)
                sc2 = tl.load(sb + int4_scale_row_offsets(rows + N, stride_sn, TR) + sg, mask=nmask, other=0)
                acc2 += (tl.dot(a_e, lo2) + tl.dot(a_o, hi2)) * sc2.to(tl.float32)[None, :]
    else:
        kk = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            ka = k0 + kk
            kmask = ka < K
            a = tl.load(a_rows + ka[None, :], mask=mvalid[:, None] & kmask[None, :], other=0.0)
            w = tl.load(wb + rows[None, :] * stride_wn + ka[:, None], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            if KIND == 1:
                s = tl.load(sb + ((pid_n * BN) // 128) * stride_sn + k0 // 128)
                acc += tl.dot(a, fp8_to(w, a.dtype)) * s
            else:
                acc = tl.dot(a, w, acc)
            if GATE_UP:
                w2 = tl.load(wb + (rows + N)[None, :] * stride_wn + ka[:, None],
                             mask=kmask[:, None] & nmask[None, :], other=0.0)
                if KIND == 1:
                    s2 = tl.load(sb + ((N + pid_n * BN) // 128) * stride_sn + k0 // 128)
                    acc2 += tl.dot(a, fp8_to(w2, a.dtype)) * s2
                else:
                    acc2 = tl.dot(a, w2, acc2)
    return acc, acc2


@triton.jit
def _tile_swapped(a_rows, mvalid, wb, sb, rows, nmask, pid_n, N, K, stride_wn, stride_sn,
                  KIND: tl.constexpr, GATE_UP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  TR: tl.constexpr, DQ_PAIRS: tl.constexpr = False):
    """_expert_tile for int4 (KIND 2) or fp8 block (KIND 1) weights with the MMA operands swapped ("swap-AB"):
    acc^T [BN, BM] += W [BN, BK] x A^T [BK, BM]. The dequantized weight tile is the MMA's first operand, which
    Hopper's wgmma reads from registers (the normal order must stage it through shared memory), and the expert's
    tokens are its N, which may be small. a_rows: [BM] pointers to the activation rows; DQ_PAIRS: int4_dq's
    PAIRS. Returns (acc, acc2) [BM, BN] like _expert_tile."""
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    acc2 = tl.zeros([BN, BM], dtype=tl.float32)
    if KIND == 2:
        jj = tl.arange(0, BK // 2)
        for k0 in range(0, K, BK):              # half-split packing, as in _expert_tile
            a_e = tl.load(a_rows[None, :] + (k0 + jj)[:, None], mask=mvalid[None, :], other=0.0)       # [BK/2, BM]
            a_o = tl.load(a_rows[None, :] + (k0 + BK // 2 + jj)[:, None], mask=mvalid[None, :], other=0.0)
            pk = int4_group_offsets(k0 // BK, TR, BK // 2) + jj
            sg = int4_scale_group_offsets(k0 // BK, TR)
            p = tl.load(wb + int4_row_offsets(rows, stride_wn, TR, BK // 2)[:, None] + pk[None, :],
                        mask=nmask[:, None], other=0)                                               # [BN, BK/2]
            lo, hi = int4_dq(p, a_e.dtype, DQ_PAIRS)
            sc = tl.load(sb + int4_scale_row_offsets(rows, stride_sn, TR) + sg, mask=nmask, other=0)
            acc += (tl.dot(lo, a_e) + tl.dot(hi, a_o)) * sc.to(tl.float32)[:, None]
            if GATE_UP:
                p2 = tl.load(wb + int4_row_offsets(rows + N, stride_wn, TR, BK // 2)[:, None] + pk[None, :],
                             mask=nmask[:, None], other=0)
                lo2, hi2 = int4_dq(p2, a_e.dtype, DQ_PAIRS)
                sc2 = tl.load(sb + int4_scale_row_offsets(rows + N, stride_sn, TR) + sg, mask=nmask, other=0)
                acc2 += (tl.dot(lo2, a_e) + tl.dot(hi2, a_o)) * sc2.to(tl.float32)[:, None]
    else:
        kk = tl.arange(0, BK)
        for k0 in range(0, K, BK):              # BK == 128: one scale block per tile, as in _expert_tile
            ka = k0 + kk
            kmask = ka < K
            a = tl.load(a_rows[None, :] + ka[:, None], mask=mvalid[None, :] & kmask[:, None], other=0.0)  # [BK, BM]
            w = tl.load(wb + rows[:, None] * stride_wn + ka[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0.0)                                                                        # [BN, BK]
            s = tl.load(sb + ((pid_n * BN) // 128) * stride_sn + k0 // 128)
            acc += tl.dot(fp8_to(w, a.dtype), a) * s
            if GATE_UP:
                w2 = tl.load(wb + (rows + N)[:, None] * stride_wn + ka[None, :],
                             mask=nmask[:, None] & kmask[None, :], other=0.0)
                s2 = tl.load(sb + ((N + pid_n * BN) // 128) * stride_sn + k0 // 128)
                acc2 += tl.dot(fp8_to(w2, a.dtype), a) * s2
    return tl.trans(acc), tl.trans(acc2)


@triton.jit
def _moe_dot_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, sorted_ptr, block_e_ptr, tw_ptr,
    N, K, P, TOPK, E,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    KIND: tl.constexpr, GATE_UP: tl.constexpr, A_SORTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, TR: tl.constexpr = 0,
    DQ_PAIRS: tl.constexpr = False,
):
    """grid (NB, cdiv(N, BN)); block pid_m holds BM pairs of expert e = block_e[pid_m].
    GATE_UP: a = x gathered by token (pair // TOPK), out = h [NB*BM, N] in sorted order, h = silu(gate) * up with
             gate rows [0, N) and up rows [N, 2N) of w13.
    else:    a = h in sorted order (A_SORTED), out = y [P, N] by pair, scaled by the router weight tw[pair]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_e_ptr + pid_m)
    if e >= E:
        return
    e = e.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    mvalid = pair < P
    if A_SORTED:
        arow = offs_m.to(tl.int64)
    else:
        arow = (pair // TOPK).to(tl.int64)
    rows = pid_n * BN + tl.arange(0, BN)
    nmask = rows < N
    if SWAP:   # int4 / fp8
        acc, acc2 = _tile_swapped(a_ptr + arow * stride_am, mvalid, w_ptr + e * stride_we, s_ptr + e * stride_se,
                                  rows, nmask, pid_n, N, K, stride_wn, stride_sn, KIND, GATE_UP, BM, BN, BK, TR,
                                  DQ_PAIRS)
    else:
        acc, acc2 = _expert_tile(a_ptr + arow[:, None] * stride_am, mvalid, w_ptr + e * stride_we,
                                 s_ptr + e * stride_se, rows, nmask, pid_n, N, K, stride_wn, stride_sn, KIND,
                                 GATE_UP, BM, BN, BK, TR)
    if GATE_UP:
        h = acc * tl.sigmoid(acc) * acc2
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + rows[None, :],
                 h.to(out_ptr.dtype.element_ty), mask=nmask[None, :])
    else:
        tw = tl.load(tw_ptr + pair, mask=mvalid, other=0.0).to(tl.float32)
        y = acc * tw[:, None]
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + rows[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mvalid[:, None] & nmask[None, :])


def _pick_bm(pairs: int, experts: int) -> int:
    per_expert = pairs / max(1, experts)
    return 16 if per_expert < 24 else 32 if per_expert < 64 else 64


def tile_cfg(w: KernelWeight, config: dict | None, defaults: dict, extra: tuple[str, ...] = ()) -> dict:
    """_expert_tile launch settings: defaults[w.kind] updated by config's known keys (and `extra` ones); int4's BK
    is its group; fp8 needs BK == 128 and BN dividing 128 (one scale block per tile)."""
    cfg = dict(defaults[w.kind])
    if config:
        cfg.update({k: v for k, v in config.items() if k in cfg or k in extra})
    if w.kind == INT4:
        cfg["bk"] = w.group
    if w.kind == FP8 and (cfg["bk"] != 128 or 128 % cfg["bn"] or 128 % cfg["bn2"]):
        raise ValueError("fp8 MoE tiles need BK == 128 and BN dividing 128")
    return cfg


def moe_sorted(x: Tensor, w13: KernelWeight, w2: KernelWeight, topk_weights: Tensor, topk_ids: Tensor,
               config: dict | None = None, reduce: bool = True) -> Tensor:
    """Prefill path; x [M, H] -> [M, H] (or [M, k, H] unsummed when not reduce). See the module docstring."""
    m, top_k = topk_ids.shape
    p, inter, hidden, experts = m * top_k, w2.k, w2.n, w13.data.shape[0]
    cfg = tile_cfg(w13, config, SORTED_DEFAULTS, extra=("bm",))
    bm = cfg.get("bm") or _pick_bm(p, experts)
    sorted_pairs, block_expert = moe_align(topk_ids, experts, bm)
    nb = block_expert.shape[0]
    tw = topk_weights.reshape(-1).contiguous()
    h = torch.empty(nb * bm, inter, dtype=x.dtype, device=x.device)
    _moe_dot_kernel[(nb, triton.cdiv(inter, cfg["bn"]))](
        x, w13.data, w13.scale, h, sorted_pairs, block_expert, tw,
        inter, w13.k, p, top_k, experts,
        x.stride(0), w13.data.stride(0), w13.data.stride(1), w13.scale.stride(0), w13.scale.stride(1), h.stride(0),
        KIND=w13.kind, GATE_UP=True, A_SORTED=False, BM=bm, BN=cfg["bn"], BK=cfg["bk"],
        SWAP=cfg.get("swap", False), TR=w13.tile_rows, DQ_PAIRS=cfg.get("dq_pairs", False), num_warps=cfg["warps"],
        num_stages=cfg["stages"])
    y = torch.empty(p, hidden, dtype=x.dtype, device=x.device)
    _moe_dot_kernel[(nb, triton.cdiv(hidden, cfg["bn2"]))](
        h, w2.data, w2.scale, y, sorted_pairs, block_expert, tw,
        hidden, w2.k, p, top_k, experts,
        h.stride(0), w2.data.stride(0), w2.data.stride(1), w2.scale.stride(0), w2.scale.stride(1), y.stride(0),
        KIND=w2.kind, GATE_UP=False, A_SORTED=True, BM=bm, BN=cfg["bn2"], BK=cfg["bk"],
        SWAP=cfg.get("swap2", False), TR=w2.tile_rows, DQ_PAIRS=cfg.get("dq_pairs", False),
        num_warps=cfg["warps2"], num_stages=cfg["stages2"])
    return y.view(m, top_k, hidden).sum(dim=1) if reduce else y.view(m, top_k, hidden)
