"""Greedy argmax over the vocabulary (Triton), the sampler's greedy rows.

torch's argmax over one [1, 151936] row is a memset of its semaphores and one multi-block reduction, ~11 us of the
H100's batch-1 decode step (docs/benchmarks.md). Here stage 1 takes the maximum of each BLOCK-wide slice (first
index on ties), stage 2 the largest of those (earliest slice on ties): the lowest index of the row's maximum, as
torch.argmax returns it. Reference: qnext.ops.moe.greedy_argmax (torch.argmax, the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release

Tensor = torch.Tensor

BLOCK = 4096


@triton.jit
def _slice_max_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, NB, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """grid (B, NB): the maximum of row b's slice s and its first index."""
    pdl_wait_then_release(PDL)
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    offs = s * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + b * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    best, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + b * NB + s, best)
    tl.store(idx_ptr + b * NB + s, s * BLOCK + i.to(tl.int64))


@triton.jit
def _pick_kernel(val_ptr, idx_ptr, out_ptr, NB, BNB: tl.constexpr, PDL: tl.constexpr = False):
    """grid (B,): the slice with the largest maximum, the earliest on ties."""
    pdl_wait_then_release(PDL)
    b = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BNB)
    v = tl.load(val_ptr + b * NB + s, mask=s < NB, other=float("-inf"))
    _, j = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + b, tl.load(idx_ptr + b * NB + j))


def greedy_argmax(logits: Tensor) -> Tensor:
    """logits [B, V] (any float dtype, unit column stride) -> [B] int64: the first index of each row's maximum."""
    b, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    nb = triton.cdiv(v, BLOCK)
    val = torch.empty(b, nb, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b, nb, dtype=torch.int64, device=logits.device)
    _slice_max_kernel[(b, nb)](logits, val, idx, v, logits.stride(0), nb, BLOCK=BLOCK, num_warps=8, **pdl_launch())
    _pick_kernel[(b,)](val, idx, out, nb, BNB=triton.next_power_of_2(nb), num_warps=1, **pdl_launch())
    return out
