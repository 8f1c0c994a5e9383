"""Weights pulled into L2 ahead of use, issued by the latency-bound kernels of a small decode step (Hopper+).

Why: a batch-1 decode step is a chain of ~600 dependent kernels. Through its short links (the GDN conv and
recurrence, norms, routing) the GPU's memory idles, and the next large projection then streams its weights with
the whole chain waiting on it (in the H100 b1 profile the MoE combine norm plus in_proj_qkvz take ~15 us for
~25 MB, ~9 us at the copy rate; docs/perf-notes.md). A kernel that starts such an idle stretch can hand the next
projection's weight to the copy engine with `cp.async.bulk.prefetch.L2` (PTX ISA 8.0, sm_90): fire and forget --
no registers, no wait, no write, so results cannot change -- and the projection then reads it from L2.

Kernel side: a kernel taking `pf_ptr, pf_bytes, PF: tl.constexpr` calls `l2_prefetch(pf_ptr, pf_bytes, PF)` after
its PDL wait (before it, the prefetch would compete with the previous kernel's own loads). Its programs split the
range into CHUNK-byte bulk requests. Host side: `prefetch_args(weight)` gives those three arguments, off (PF=False)
when the switch is off, without CUDA, before sm_90 or under Triton's interpreter (which cannot run PTX).
The model decides what each kernel prefetches (qnext/model/prefetch.py); only weights, which no step writes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Module switch (A/B runs: a fresh engine captures its CUDA graphs under the setting); QNEXT_L2_PREFETCH=0 at start
L2_PREFETCH = os.environ.get("QNEXT_L2_PREFETCH", "1") != "0"
CHUNK = tl.constexpr(32768)   # bytes per bulk request (16-byte multiple; the range's tail is rounded down to 16)
SLOTS = tl.constexpr(32)      # requests a program issues per loop step (one per thread of a warp)


@functools.cache
def _hopper() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9


def supported(weight: Tensor) -> bool:
    """A contiguous, 16-byte aligned tensor on an sm_90+ GPU, outside the interpreter."""
    return weight.is_cuda and _hopper() and weight.is_contiguous() and weight.data_ptr() % 16 == 0


def prefetch_args(weight: Tensor | None) -> dict:
    """Keyword arguments for a kernel taking (pf_ptr, pf_bytes, PF): all of weight's bytes, or PF=False."""
    if weight is None or not L2_PREFETCH or not supported(weight):
        return dict(pf_ptr=None, pf_bytes=0, PF=False)
    flat = weight.view(-1).view(torch.uint8)
    return dict(pf_ptr=flat, pf_bytes=flat.numel() // 16 * 16, PF=True)


@triton.jit
def l2_prefetch(pf_ptr, pf_bytes, PF: tl.constexpr):
    """Bulk L2 prefetches of [pf_ptr, pf_ptr + pf_bytes) (a uint8 pointer, 16-byte aligned; pf_bytes a multiple
    of 16), shared among the grid's programs: program p issues chunks p * SLOTS + [0, SLOTS), then every
    num_programs * SLOTS further."""
    if PF:
        nprog = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        chunks = tl.cdiv(pf_bytes, CHUNK)
        for c0 in range(pid * SLOTS, chunks, nprog * SLOTS):
            c = c0 + tl.arange(0, SLOTS)
            start = c.to(tl.int64) * CHUNK
            size = tl.minimum(pf_bytes - start, CHUNK).to(tl.int32)
            size = tl.where(c < chunks, size, 0)
            tl.inline_asm_elementwise(
                # only the first warp issues (it holds all SLOTS; other warps hold copies of the same chunks)
                "{ .reg .pred p, q; .reg .u32 t; mov.u32 t, %tid.x; setp.lt.u32 q, t, 32; setp.gt.s32 p, $2, 0; "
                "and.pred p, p, q; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
                "=r,l,r", [pf_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)
