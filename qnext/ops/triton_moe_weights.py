"""Kernel view of stacked expert weights for the fused-MoE Triton kernels (triton_moe_gemv, triton_moe_sorted),
and the int4 dequantization trick both use. Formats: qnext.ops.quant."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qnext.ops.quant import Fp8BlockWeight, Int4GroupWeight, QuantWeight

Tensor = torch.Tensor

BF16, FP8, INT4 = 0, 1, 2


@dataclass
class KernelWeight:
    """Kernel view of one stacked expert weight."""
    kind: int
    data: Tensor           # bf16 [E, N, K] | fp8 [E, N, K] | uint8 [E, N, K/2]
    scale: Tensor          # fp8: [E, N/128, K/128] f32 | int4: [E, N, K/G] bf16 | bf16: data (unused)
    n: int
    k: int                 # logical K
    group: int             # int4 group (elements) / fp8 block; 0 for bf16

    @property
    def klim(self) -> int:  # stored units per row
        return self.k // 2 if self.kind == INT4 else self.k


def kernel_view(w: QuantWeight) -> KernelWeight:
    if isinstance(w, Fp8BlockWeight):
        e, n, k = w.w.shape
        if w.block != 128 or n % 128 or k % 128:
            raise ValueError(f"fp8 MoE kernels need 128x128 blocks and N, K multiples of 128, got {n}x{k}/{w.block}")
        return KernelWeight(FP8, w.w.contiguous(), w.scale_inv.float().contiguous(), n, k, 128)
    if isinstance(w, Int4GroupWeight):
        e, n, kh = w.qweight.shape
        return KernelWeight(INT4, w.qweight.contiguous(), w.scale.contiguous(), n, 2 * kh, w.group_size)
    if w.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"MoE kernels take bf16/fp16/fp8/int4 weights, got {w.dtype}")
    w = w.contiguous()
    return KernelWeight(BF16, w, w, w.shape[1], w.shape[2], 0)


@triton.jit
def int4_dq(p, DT: tl.constexpr):
    """uint8 tile -> (low, high) nibbles as q - 8 in DT (bf16 or fp16) without int->float converts (those run at
    quarter rate): the bf16 with bits 0x4300 | q is 128 + q exactly (fp16: 0x6400 | q is 1024 + q), and the
    subtraction is exact. Both use packed HADD2 on sm90."""
    if DT == tl.float16:
        lo = (((p & 0xF).to(tl.int16) | 0x6400).to(tl.int16)).to(tl.float16, bitcast=True) - 1032.0
        hi = (((p >> 4).to(tl.int16) | 0x6400).to(tl.int16)).to(tl.float16, bitcast=True) - 1032.0
    else:
        lo = (((p & 0xF).to(tl.int16) | 0x4300).to(tl.int16)).to(tl.bfloat16, bitcast=True) - 136.0
        hi = (((p >> 4).to(tl.int16) | 0x4300).to(tl.int16)).to(tl.bfloat16, bitcast=True) - 136.0
    return lo.to(DT), hi.to(DT)
