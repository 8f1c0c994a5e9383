"""Kernel view of stacked expert weights for the fused-MoE Triton kernels (triton_moe_gemv, triton_moe_sorted),
the int4 dequantization trick they use, and the e4m3 -> 16-bit conversion of every fp8 dot (fp8_to; also the
dense w8a16 tiles of triton_linear_fp8). Formats: qnext.ops.quant."""

from __future__ import annotations

import os
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
    tile_rows: int = 0     # int4: rows per tile of the tiled storage (0: rows; see int4_row_offsets)

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
        return KernelWeight(INT4, w.qweight.contiguous(), w.scale.contiguous(), n, 2 * kh, w.group_size, w.tile_rows)
    if w.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"MoE kernels take bf16/fp16/fp8/int4 weights, got {w.dtype}")
    w = w.contiguous()
    return KernelWeight(BF16, w, w, w.shape[1], w.shape[2], 0)


# int4 addressing. The offset of byte j of group g of row n in one expert's data splits into a row part and a
# group part (rows: n * stride + g * G/2 + j; tiles of T rows: (n // T) * T * stride + (n % T) * G/2 +
# g * T * G/2 + j), and likewise a scale's (rows: n * stride + g; tiles: (n // T) * T * stride + n % T + g * T),
# so a kernel keeps its per-row pointers and steps its group offsets. TR is the weight's tile_rows, GB = G/2.
@triton.jit
def int4_row_offsets(rows, stride_wn, TR: tl.constexpr, GB: tl.constexpr):
    if TR == 0:
        return rows * stride_wn
    return (rows // TR) * (TR * stride_wn) + (rows % TR) * GB


@triton.jit
def int4_group_offsets(g, TR: tl.constexpr, GB: tl.constexpr):
    """Offset of group g's first byte within its row (the byte offset j inside the group is added as is)."""
    if TR == 0:
        return g * GB
    return g * (TR * GB)


@triton.jit
def int4_unit_offsets(u, TR: tl.constexpr, GB: tl.constexpr):
    """Offset of stored byte u of a row (u // GB its group)."""
    if TR == 0:
        return u
    return (u // GB) * (TR * GB) + u % GB


@triton.jit
def int4_scale_row_offsets(rows, stride_sn, TR: tl.constexpr):
    if TR == 0:
        return rows * stride_sn
    return (rows // TR) * (TR * stride_sn) + rows % TR


@triton.jit
def int4_scale_group_offsets(g, TR: tl.constexpr):
    if TR == 0:
        return g
    return g * TR


# int4 -> 16-bit dequantization: "asm" (default on the GPU) or "arith" (the Triton-language version; always under
# Triton's CPU interpreter, which cannot run inline PTX). QNEXT_INT4_DQ=arith selects it for A/B timings.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT4_DQ_ASM: tl.constexpr = tl.constexpr(os.environ.get("QNEXT_INT4_DQ", "asm") == "asm" and not INTERPRETED)
# The interpreter (Triton 3.9) keeps bf16 as numpy integers and gets both the int16 -> bf16 bitcast and bf16 tl.dot
# wrong, so there the nibbles go through plain int -> float converts (the same exact values) and dots run in fp32.
INT4_DQ_CONVERT: tl.constexpr = tl.constexpr(INTERPRETED)

# One 32-bit word = 4 packed bytes -> (low nibbles, high nibbles) as bf16x2 / fp16x2 pairs, 12 instructions per 8
# values: prmt puts bytes (0, 1) and (2, 3) in the two 16-bit halves, lop3 keeps a nibble per half and ORs in the
# exponent of 128 (bf16 0x4300; fp16 1024, 0x6400) so each half reads 128 + q (1024 + q), and one packed fma
# subtracts 136 (1032): exactly q - 8. The arithmetic version costs about twice the instructions (per-byte
# extraction and converts). Output registers: $0 $1 low nibbles of bytes 0-1, 2-3; $2 $3 high nibbles; $4 input.
_DQ_ASM = """{{
.reg .b32 t01, t23, one, bias;
mov.b32 one, {one};
mov.b32 bias, {bias};
prmt.b32 t01, $4, $4, 0x0100;
prmt.b32 t23, $4, $4, 0x0302;
lop3.b32 $0, t01, 0x000F000F, {magic}, 0xEA;
lop3.b32 $1, t23, 0x000F000F, {magic}, 0xEA;
shr.u32 t01, t01, 4;
shr.u32 t23, t23, 4;
lop3.b32 $2, t01, 0x000F000F, {magic}, 0xEA;
lop3.b32 $3, t23, 0x000F000F, {magic}, 0xEA;
fma.rn.{ty}x2 $0, $0, one, bias;
fma.rn.{ty}x2 $1, $1, one, bias;
fma.rn.{ty}x2 $2, $2, one, bias;
fma.rn.{ty}x2 $3, $3, one, bias;
}}"""
# Per 16-bit type: 1.0 x2, -136 x2 (fp16: -1032), the exponent ORed in, the PTX type.
_DQ_BF16 = dict(one="0x3F803F80", bias="0xC308C308", magic="0x43004300", ty="bf16")
_DQ_FP16 = dict(one="0x3C003C00", bias="0xE408E408", magic="0x64006400", ty="f16")
_DQ_ASM_BF16: tl.constexpr = tl.constexpr(_DQ_ASM.format(**_DQ_BF16))
_DQ_ASM_FP16: tl.constexpr = tl.constexpr(_DQ_ASM.format(**_DQ_FP16))

# The same for two bytes (a 16-bit input: pack=2), 7 instructions per 4 values: prmt spreads bytes 0 and 1 into the
# two 16-bit halves (zeros above them), then one lop3 / fma per half as above. Output registers: $0 low nibbles, $1
# high nibbles, each a (byte 0, byte 1) pair. Where Triton feeds int4_dq from shared memory in the MMA's register
# operand layout (the sorted path's swapped tiles: each thread holds pairs of consecutive bytes, loaded 16 bits at
# a time), the 4-byte version made it assemble words first and split them again (offline SASS, sorted int4 gate_up
# at 8K tokens: 595 -> 483 instructions per K step, PRMT 148 -> 36); elsewhere (the grouped decode kernel: 396 ->
# 529) the 4-byte version is the right one, hence a choice per call site (int4_dq's PAIRS).
_DQ2_ASM = """{{
.reg .b32 t, one, bias;
mov.b32 one, {one};
mov.b32 bias, {bias};
cvt.u32.u16 t, $2;
prmt.b32 t, t, 0, 0x4140;
lop3.b32 $0, t, 0x000F000F, {magic}, 0xEA;
shr.u32 t, t, 4;
lop3.b32 $1, t, 0x000F000F, {magic}, 0xEA;
fma.rn.{ty}x2 $0, $0, one, bias;
fma.rn.{ty}x2 $1, $1, one, bias;
}}"""
_DQ2_ASM_BF16: tl.constexpr = tl.constexpr(_DQ2_ASM.format(**_DQ_BF16))
_DQ2_ASM_FP16: tl.constexpr = tl.constexpr(_DQ2_ASM.format(**_DQ_FP16))


@triton.jit
def int4_dq(p, DT: tl.constexpr, PAIRS: tl.constexpr = False):
    """uint8 tile -> (low, high) nibbles as q - 8 in DT (bf16 or fp16) without int->float converts (those run at
    quarter rate): the bf16 with bits 0x4300 | q is 128 + q exactly (fp16: 0x6400 | q is 1024 + q), and the
    subtraction is exact. INT4_DQ_ASM: four bytes at a time in inline PTX (see _DQ_ASM), or two with PAIRS (see
    _DQ2_ASM); else Triton ops (packed HADD2 on sm90)."""
    if INT4_DQ_ASM and PAIRS:
        if DT == tl.float16:
            lo, hi = tl.inline_asm_elementwise(_DQ2_ASM_FP16, "=r,=r,h", [p], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=2)
        else:
            lo, hi = tl.inline_asm_elementwise(_DQ2_ASM_BF16, "=r,=r,h", [p], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=2)
    elif INT4_DQ_ASM:
        if DT == tl.float16:
            lo, hi = tl.inline_asm_elementwise(_DQ_ASM_FP16, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_DQ_ASM_BF16, "=r,=r,=r,=r,r", [p],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    elif INT4_DQ_CONVERT:
        lo = (p & 0xF).to(tl.float32) - 8.0
        hi = (p >> 4).to(tl.float32) - 8.0
    elif DT == tl.float16:
        lo = (((p & 0xF).to(tl.int16) | 0x6400).to(tl.int16)).to(tl.float16, bitcast=True) - 1032.0
        hi = (((p >> 4).to(tl.int16) | 0x6400).to(tl.int16)).to(tl.float16, bitcast=True) - 1032.0
    else:
        lo = (((p & 0xF).to(tl.int16) | 0x4300).to(tl.int16)).to(tl.bfloat16, bitcast=True) - 136.0
        hi = (((p >> 4).to(tl.int16) | 0x4300).to(tl.int16)).to(tl.bfloat16, bitcast=True) - 136.0
    return lo.to(DT), hi.to(DT)


# fp8_to's route (QNEXT_FP8_CVT=direct: Triton's own e4m3 -> bf16, for A/B runs in a fresh process).
FP8_VIA_F32: tl.constexpr = tl.constexpr(os.environ.get("QNEXT_FP8_CVT", "f32") == "f32")


@triton.jit
def fp8_to(w, DT: tl.constexpr):
    """A loaded weight tile -> DT (a dot's 16-bit operand type), exactly. For e4m3 -> bf16 the way matters: Triton
    lowers it to a cvt into f16 pairs and then one F2F per value, a conversion that issues at 16 per clock per SM
    (the batch-1 fp8 expert gate_up kept that pipe 55% busy, Nsight Compute on the H100); through float32 it is the
    same cvt, HADD2.F32 (the FMA pipe) and one packing F2FP per pair, no F2F, as many instructions (offline SASS:
    scripts/offline_sass.py gateup / fp8small / grouped / sorted). Other types convert directly."""
    if FP8_VIA_F32 and w.dtype.is_fp8() and DT == tl.bfloat16:
        return w.to(tl.float32).to(DT)
    return w.to(DT)
