"""fp16 operands for fp8 weights (a Triton helper shared by the fp8 kernels that multiply bf16 activations).

e4m3 -> fp16 is one conversion instruction per two weights; e4m3 -> bf16 goes through fp16 and takes one more per
weight (offline SASS: F2FP.F16.E4M3.UNPACK_B, then F2F.BF16.F16), and conversions issue at a quarter of the FP32
rate on Hopper (16 per clock per SM). So such kernels may run their dots in fp16: the activations are divided by a
power of two that brings their largest into fp16's range (exact: the fp16 values are the bf16 ones over that
power, down to fp16's subnormals, 2^29 below the largest), and the float32 sums are multiplied back by it. fp16
keeps 10 mantissa bits to bf16's 7, so the dot is at least as exact.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pow2_fp16_scales(amax):
    """amax >= 0 (float32, any shape) -> (scale, inv): powers of two, scale * inv = 1, amax * inv < 2^15 (fp16's
    largest is 65,504), taken from amax's exponent bits (no rounding)."""
    ex = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15), 254)   # amax < 2^(ex - 126)
    scale = ((ex - 14) << 23).to(tl.float32, bitcast=True)                                  # 2^(ex - 141)
    inv = ((268 - ex) << 23).to(tl.float32, bitcast=True)                                   # 2^(141 - ex)
    return scale, inv


@triton.jit
def fp16_rows(x):
    """x [R, C] -> (x divided by a power of two per row, in fp16; those powers [R] float32, to multiply the row's
    sums by)."""
    xf = x.to(tl.float32)
    scale, inv = pow2_fp16_scales(tl.max(tl.abs(xf), axis=1))
    return (xf * inv[:, None]).to(tl.float16), scale
