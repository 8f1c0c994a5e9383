"""Feed-forward glue kernels (Triton), one launch each where torch takes 3-6. Semantics of qnext.ops.moe:

    moe_route(logits, top_k, renormalize) -> (ids, weights)   softmax + top-k (+ renormalise), one program per token
    silu_mul(gate, up) -> silu(gate) * up                     SwiGLU activation
    sigmoid_gate_add(y, gate, s) -> y + sigmoid(gate) * s     shared expert added to the routed experts' output
                                                              (y may be their unsummed [T, k, H]: summed here)
Math in float32, one rounding to the output dtype (torch's chain rounds after each op: differences of ~1 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release

Tensor = torch.Tensor


@triton.jit
def _route_row(logits_ptr, ids_ptr, w_ptr, t, E, stride_t,
               K: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, RENORM: tl.constexpr):
    """Token t: probabilities of E experts, the K largest (descending, lowest index first on ties)."""
    t = t.to(tl.int64)
    offs = tl.arange(0, BE)
    x = tl.load(logits_ptr + t * stride_t + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(offs < E, p, -2.0)                 # padding is never picked (K <= E)
    kk = tl.arange(0, BK)
    ids = tl.zeros([BK], dtype=tl.int64)
    ws = tl.zeros([BK], dtype=tl.float32)
    for j in tl.static_range(K):
        best, idx = tl.max(p, axis=0, return_indices=True, return_indices_tie_break_left=True)   # one reduction
        ids = tl.where(kk == j, idx.to(tl.int64), ids)
        ws = tl.where(kk == j, best, ws)
        p = tl.where(offs == idx, -1.0, p)          # taken
    if RENORM:
        ws = ws / tl.sum(ws, axis=0)
    tl.store(ids_ptr + t * K + kk, ids, mask=kk < K)
    tl.store(w_ptr + t * K + kk, ws, mask=kk < K)


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, w_ptr, E, stride_t,
                  K: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, RENORM: tl.constexpr,
                  PDL: tl.constexpr = False):
    """grid (T,): _route_row of token program_id(0)."""
    pdl_wait_then_release(PDL)
    _route_row(logits_ptr, ids_ptr, w_ptr, tl.program_id(0), E, stride_t, K, BE, BK, RENORM)


def moe_route(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """logits [T, E] router output -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
    t, e = logits.shape
    if not 0 < top_k <= e:
        raise ValueError(f"top_k {top_k} must be in 1..{e}")
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        be = triton.next_power_of_2(e)
        _route_kernel[(t,)](logits, ids, weights, e, logits.stride(0), K=top_k, BE=be,
                            BK=triton.next_power_of_2(top_k), RENORM=renormalize, num_warps=1, **pdl_launch())
    return ids, weights


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """grid (rows, cdiv(N, BLOCK)): o[r] = silu(g[r]) * u[r] over N columns; g and u rows may be strided (the two
    halves of one [T, 2I] projection), o is contiguous."""
    pdl_wait_then_release(PDL)
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + r * stride_g + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_u + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + r * N + offs, (g * tl.sigmoid(g) * u).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gate_add_kernel(y_ptr, g_ptr, s_ptr, o_ptr, H, stride_g, K: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    """grid (T, cdiv(H, BLOCK)): o[t] = sum_j y[t, j] + sigmoid(g[t]) * s[t] (y [T, K, H]); g is one scalar per
    token, stride_g apart (a column of the router's stacked output)."""
    pdl_wait_then_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H
    gate = tl.sigmoid(tl.load(g_ptr + t * stride_g + 0 * offs).to(tl.float32))
    y = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        y += tl.load(y_ptr + (t * K + j) * H + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + t * H + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + t * H + offs, (y + gate * s).to(o_ptr.dtype.element_ty), mask=m)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [..., I] (rows may be strided, columns contiguous) -> silu(gate) * up, contiguous."""
    shape, n = gate.shape, gate.shape[-1]
    gate, up = (t.reshape(-1, n) if t.stride(-1) == 1 else t.contiguous().view(-1, n) for t in (gate, up))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        _silu_mul_kernel[(gate.shape[0], triton.cdiv(n, 1024))](gate, up, out, n, gate.stride(0), up.stride(0),
                                                                BLOCK=1024, num_warps=4, **pdl_launch())
    return out.view(shape)


def sigmoid_gate_add(y: Tensor, gate: Tensor, s: Tensor) -> Tensor:
    """y [T, H] or [T, k, H] (summed over k here); s [T, H]; gate [T, 1] -> y + sigmoid(gate) * s in y.dtype."""
    y, s = y.contiguous(), s.contiguous()
    t, h = s.shape
    out = torch.empty_like(s)
    if t:
        _gate_add_kernel[(t, triton.cdiv(h, 1024))](y, gate, s, out, h, gate.stride(0),
                                                    K=y.shape[1] if y.dim() == 3 else 1, BLOCK=1024, num_warps=4,
                                                    **pdl_launch())
    return out
