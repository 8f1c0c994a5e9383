"""Causal depthwise conv1d (+ SiLU) with a conv state, Triton. Semantics of qnext.ops.causal_conv:

channel c at token t: y = act(sum_j w[c, j] * x[c, t - (K-1) + j]); inputs before a sequence's first new token come
from its state [C, K-1] (the last K-1 inputs, oldest first; zeros for a fresh sequence); afterwards the state holds
the last K-1 inputs of (old state ++ new tokens). Math in float32.

fla-core has a causal conv too, but its state keeps K columns (ours, the model cache's, keeps K-1), so these are
our own small kernels, slot-indexed and in place on the model's conv cache [num_slots, C, K-1]:
    causal_conv1d_prefill_(x, weight, conv_cache, state_slots, has_initial_state, cu_seqlens) -> y   (3 launches)
    causal_conv1d_update_(x, weight, conv_cache, state_slots, has_initial_state) -> y               (1 launch)
plus registry-compatible wrappers causal_conv1d / causal_conv1d_update (functional: state in, state out).
x may be a strided view (row stride != C, unit channel stride), e.g. columns of the in_proj output, and with
x_cols [C] int32 channel c reads x's column x_cols[c] (the GDN layer's q, k, v heads straight out of in_proj_qkvz's
interleaved output, without the copy that would gather them). x_cols_run = R (a power of two) says more: every
aligned run of R channels reads R consecutive columns, so the prefill kernel reads its channel block as one
contiguous, vectorizable row segment from x_cols[block start]; per-channel gathered columns cost ~4x the time
(H200, 8K tokens x 8192 channels: 1.58 ms against 0.38 by runs and 0.34 for a contiguous input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release

Tensor = torch.Tensor


@triton.jit
def _activate_store(y_ptr, acc, ot, oc, tmask, cmask, c0, T, C, C1, C2, SILU: tl.constexpr):
    """SiLU (if SILU) of acc [tokens ot, channels oc of block c0], stored into y: three contiguous planes one after
    the other, channels [0, C1) as [T, C1], [C1, C2) as [T, C2 - C1], [C2, C) as [T, C - C2] (C1 = C2 = C: one
    [T, C]); a block lies in one plane, which starts at its first channel pc times T and has rows of pw."""
    if SILU:
        acc = acc * tl.sigmoid(acc)
    pc = tl.where(c0 >= C2, C2, tl.where(c0 >= C1, C1, 0))
    pw = tl.where(c0 >= C2, C, tl.where(c0 >= C1, C2, C1)) - pc
    tl.store(y_ptr + pc.to(tl.int64) * T + ot.to(tl.int64)[:, None] * pw + (oc - pc)[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _x_columns(cols_ptr, c0, oc, cmask, BC: tl.constexpr, COLS: tl.constexpr):
    """x column of each channel oc: COLS 0 channel c is column c; 1 column cols[c]; 2 the block's columns are
    cols[c0] + 0..BC-1 (aligned runs, so its row segment is contiguous)."""
    if COLS == 2:
        return tl.multiple_of(tl.load(cols_ptr + c0), 16) + tl.arange(0, BC)
    elif COLS == 1:
        return tl.load(cols_ptr + oc, mask=cmask, other=0)
    else:
        return oc


@triton.jit
def _conv_prefill_kernel(
    x_ptr, cols_ptr, w_ptr, y_ptr, T, C, C1, C2, stride_xt,
    KW: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr, COLS: tl.constexpr,
):
    """grid (cdiv(T, BT), cdiv(C, BC)): y for BT tokens x BC channels as if the T tokens were one sequence without
    a state (inputs before token 0 are zeros). The first K-1 tokens of every sequence come out wrong here (their
    taps read the previous sequence's inputs instead of their own state): _conv_head_kernel rewrites them after.
    Why not handle them here: the sequence lookups, state gathers and masks per token took this kernel to 242
    registers (2 programs per SM) and chained three dependent loads before the inputs' (offline SASS, sm_90)."""
    c0 = tl.program_id(1) * BC
    ot = tl.program_id(0) * BT + tl.arange(0, BT)
    oc = c0 + tl.arange(0, BC)
    tmask = ot < T
    cmask = oc < C
    xc = _x_columns(cols_ptr, c0, oc, cmask, BC, COLS)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(KW):
        wj = tl.load(w_ptr + oc * KW + j, mask=cmask, other=0).to(tl.float32)
        src = ot - (KW - 1) + j                    # input token of tap j
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xt + xc[None, :],
                     mask=(tmask & (src >= 0))[:, None] & cmask[None, :], other=0).to(tl.float32)
        acc += xv * wj[None, :]
    _activate_store(y_ptr, acc, ot, oc, tmask, cmask, c0, T, C, C1, C2, SILU)


@triton.jit
def _conv_head_kernel(
    x_ptr, cols_ptr, w_ptr, state_ptr, slots_ptr, init_ptr, cu_ptr, y_ptr,
    T, C, C1, C2, stride_xt, stride_ss, stride_sc,
    KW: tl.constexpr, BH: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr, COLS: tl.constexpr,
):
    """grid (N, cdiv(C, BC)): y for the first min(K-1, length) tokens of sequence n, whose taps reach back into its
    conv state (zeros without an initial state), over what _conv_prefill_kernel wrote there; the same sum in the
    same order (a tap reads x or the state, the other term is 0). Reads the state before _conv_state_kernel
    replaces it."""
    n = tl.program_id(0)
    c0 = tl.program_id(1) * BC
    oc = c0 + tl.arange(0, BC)
    cmask = oc < C
    xc = _x_columns(cols_ptr, c0, oc, cmask, BC, COLS)
    bos = tl.load(cu_ptr + n)
    eos = tl.load(cu_ptr + n + 1)
    oh = tl.arange(0, BH)
    ot = bos + oh                                  # [BH] the sequence's first tokens
    tmask = (oh < KW - 1) & (ot < eos)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    init = tl.load(init_ptr + n + 0 * oh).to(tl.int32) != 0     # [BH]: a vector, as the interpreter wants
    acc = tl.zeros([BH, BC], dtype=tl.float32)
    for j in tl.static_range(KW):
        wj = tl.load(w_ptr + oc * KW + j, mask=cmask, other=0).to(tl.float32)
        src = ot - (KW - 1) + j                    # input token of tap j
        inside = src >= bos
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xt + xc[None, :],
                     mask=(tmask & inside)[:, None] & cmask[None, :], other=0).to(tl.float32)
        col = (KW - 1) + src - bos                 # state column when src precedes the sequence: 0..K-2
        sv = tl.load(state_ptr + slot * stride_ss + oc[None, :] * stride_sc + col[:, None],
                     mask=(tmask & (~inside) & init)[:, None] & cmask[None, :], other=0).to(tl.float32)
        acc += (xv + sv) * wj[None, :]
    _activate_store(y_ptr, acc, ot, oc, tmask, cmask, c0, T, C, C1, C2, SILU)


@triton.jit
def _conv_state_kernel(
    x_ptr, cols_ptr, state_ptr, slots_ptr, init_ptr, cu_ptr,
    C, stride_xt, stride_ss, stride_sc,
    KW: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr, HAS_COLS: tl.constexpr,
):
    """grid (N, cdiv(C, BC)): state[slot] <- last K-1 inputs of (old state ++ tokens [cu[n], cu[n+1]))."""
    n = tl.program_id(0)
    oc = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = oc < C
    bos = tl.load(cu_ptr + n)
    eos = tl.load(cu_ptr + n + 1)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    xc = tl.load(cols_ptr + oc, mask=cmask, other=0) if HAS_COLS else oc
    ow = tl.arange(0, BW)
    init = tl.load(init_ptr + n + 0 * ow).to(tl.int32) != 0     # [BW]: a vector, as the interpreter wants
    wmask = ow < KW - 1
    src = eos - (KW - 1) + ow                       # input feeding new state column ow
    inside = src >= bos
    xv = tl.load(x_ptr + src.to(tl.int64)[None, :] * stride_xt + xc[:, None],
                 mask=cmask[:, None] & (wmask & inside)[None, :], other=0)
    col = (KW - 1) + src - bos
    base = state_ptr + slot * stride_ss + oc[:, None] * stride_sc
    sv = tl.load(base + col[None, :], mask=cmask[:, None] & (wmask & (~inside) & init)[None, :], other=0)
    new = xv.to(tl.float32) + sv.to(tl.float32)
    tl.debug_barrier()                              # every old column is read before any is overwritten
    tl.store(base + ow[None, :], new.to(state_ptr.dtype.element_ty), mask=cmask[:, None] & wmask[None, :])


@triton.jit
def _column(t, j, i: tl.constexpr):
    """Column i of t [BC, BKW] (j = tl.arange(0, BKW)), exactly: the other terms of the sum are zeros."""
    return tl.sum(tl.where(j[None, :] == i, t, 0.0), axis=1)


@triton.jit
def _conv_update_kernel(
    x_ptr, cols_ptr, w_ptr, state_ptr, slots_ptr, init_ptr, y_ptr,
    C, stride_xn, stride_yn, stride_ss, stride_sc,
    KW: tl.constexpr, BC: tl.constexpr, BKW: tl.constexpr, SILU: tl.constexpr, HAS_COLS: tl.constexpr,
    HAS_INIT: tl.constexpr, EARLY: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """grid (N, cdiv(C, BC)): one new token per sequence; each thread reads and rewrites only its own channels'
    state columns, so the in-place shift needs no barrier. A sequence without initial state reads zeros.
    The window [BC, BKW] holds each channel's K-1 state columns (oldest first), then the new input.
    EARLY: the state columns, weights and column map are loaded before the PDL wait (the caller guarantees that the
    kernel launched right before this one writes none of them); only x waits."""
    if not EARLY:
        pdl_wait_then_release(PDL)
    n = tl.program_id(0)
    oc = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = oc < C
    j = tl.arange(0, BKW)
    xc = tl.load(cols_ptr + oc, mask=cmask, other=0) if HAS_COLS else oc
    base = state_ptr + tl.load(slots_ptr + n).to(tl.int64) * stride_ss + oc * stride_sc
    window, w = conv_window(base, w_ptr, init_ptr, n, oc, cmask, j, KW, HAS_INIT)
    if EARLY:
        pdl_wait_then_release(PDL)
    xv = tl.load(x_ptr + n.to(tl.int64) * stride_xn + xc, mask=cmask, other=0)
    acc = conv_step(xv, window, w, base, j, cmask, KW, SILU)
    tl.store(y_ptr + n.to(tl.int64) * stride_yn + oc, acc.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def conv_window(base, w_ptr, init_ptr, n, oc, cmask, j, KW: tl.constexpr, HAS_INIT: tl.constexpr):
    """(window [BC, BKW]: the K-1 state columns of channels oc (in cmask) of sequence n, at their state rows base,
    zeros where init[n] is false (HAS_INIT); w [BC, BKW]: their conv weights [C, KW]), for conv_step. Also the
    in_proj GEMV's conv epilogue's loads (qnext.ops.triton_fused_linear)."""
    smask = cmask
    if HAS_INIT:
        smask = cmask & (tl.load(init_ptr + n + 0 * oc).to(tl.int32) != 0)
    window = tl.load(base[:, None] + j[None, :], mask=smask[:, None] & (j < KW - 1)[None, :], other=0)
    w = tl.load(w_ptr + oc[:, None] * KW + j[None, :], mask=cmask[:, None] & (j < KW)[None, :], other=0)
    return window, w


@triton.jit
def conv_step(xv, window, w, base, j, cmask, KW: tl.constexpr, SILU: tl.constexpr):
    """One new token xv [BC] of channels whose window [BC, BKW] holds their K-1 state columns (oldest first; zeros
    for a fresh sequence) and w [BC, BKW] their weights: stores the shifted state at base [BC] (each channel's
    state row; channels in cmask) and returns the conv output, float32 (SiLU'd when SILU). Also the epilogue of
    qnext.ops.triton_fused_linear's in_proj GEMV (the same operations in the same order: the same bits)."""
    window = tl.where(j[None, :] == KW - 1, xv[:, None].to(window.dtype), window)
    wf, wd = w.to(tl.float32), window.to(tl.float32)
    acc = xv.to(tl.float32) * _column(wf, j, KW - 1)    # newest first, then oldest to newest: one fixed order
    for i in tl.static_range(KW - 1):
        acc += _column(wd, j, i) * _column(wf, j, i)
    # the shift: column i of the new state is column i + 1 of the window
    tl.store(base[:, None] + (j - 1)[None, :], window, mask=cmask[:, None] & ((j >= 1) & (j < KW))[None, :])
    if SILU:
        acc = acc * tl.sigmoid(acc)
    return acc


def causal_conv1d_prefill_(x: Tensor, weight: Tensor, conv_cache: Tensor, state_slots: Tensor,
                           has_initial_state: Tensor, cu_seqlens: Tensor, activation: str | None = "silu",
                           x_cols: Tensor | None = None, bt: int = 32, bc: int = 128, x_cols_run: int = 1,
                           warps: int = 4, split: tuple[int, int] | None = None) -> Tensor | tuple[Tensor, ...]:
    """x [T, C] (unit channel stride), or [T, *] with x_cols [C] int32 naming the column of each channel
    (x_cols_run: see the module docstring; a run of >= 16 aligned columns); weight [C, K] (or [C, 1, K]);
    conv_cache [num_slots, C, K-1]; state_slots [N]; has_initial_state [N] bool; cu_seqlens [N+1] -> y [T, C] in
    x.dtype; state updated in place.
    split (c1, c2): y as three contiguous tensors [T, c1], [T, c2], [T, C - c1 - c2] (the GDN layer's q, k, v,
    which fla's chunked kernel would otherwise copy to make them contiguous: 3 copies, ~6 ms per 8K prefill).
    Three launches: every token as one stateless sequence, then each sequence's first K-1 tokens again with its
    state, then the new states."""
    t, c = x.shape[0], weight.shape[0]
    c1, c2 = (split[0], split[0] + split[1]) if split else (c, c)
    if x_cols is not None and x_cols_run >= 16:
        bc = min(bc, x_cols_run)
    while split and (c1 % bc or (c2 - c1) % bc):   # a block lies in one output plane (bc: a power of two)
        bc //= 2
    cols_mode = 0 if x_cols is None else 2 if x_cols_run >= 16 and bc >= 16 else 1
    w = weight.reshape(c, -1).contiguous()
    kw = w.shape[1]
    if x.stride(1) != 1 or conv_cache.stride(2) != 1:
        raise ValueError("x and conv_cache need a unit stride in their last dim")
    flat = torch.empty(t * c, dtype=x.dtype, device=x.device)
    y = flat.view(t, c) if not split else (flat[:t * c1].view(t, c1), flat[t * c1:t * c2].view(t, c2 - c1),
                                           flat[t * c2:].view(t, c - c2))
    if t == 0:
        return y
    cols, n, silu = x_cols if x_cols is not None else w, cu_seqlens.shape[0] - 1, activation == "silu"
    _conv_prefill_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc))](
        x, cols, w, flat, t, c, c1, c2, x.stride(0), KW=kw, BT=bt, BC=bc, SILU=silu, COLS=cols_mode,
        num_warps=warps)
    _conv_head_kernel[(n, triton.cdiv(c, bc))](
        x, cols, w, conv_cache, state_slots, has_initial_state, cu_seqlens, flat,
        t, c, c1, c2, x.stride(0), conv_cache.stride(0), conv_cache.stride(1),
        KW=kw, BH=triton.next_power_of_2(max(kw - 1, 1)), BC=bc, SILU=silu, COLS=cols_mode, num_warps=4)
    _conv_state_kernel[(n, triton.cdiv(c, 256))](
        x, cols, conv_cache, state_slots, has_initial_state, cu_seqlens,
        c, x.stride(0), conv_cache.stride(0), conv_cache.stride(1),
        KW=kw, BW=triton.next_power_of_2(max(kw - 1, 1)), BC=256, HAS_COLS=x_cols is not None, num_warps=4)
    return y


# causal_conv1d_update_ loads the conv state and weights before the PDL wait (the kernel's EARLY); False for A/B runs.
EARLY_STATE_LOAD = True


def causal_conv1d_update_(x: Tensor, weight: Tensor, conv_cache: Tensor, state_slots: Tensor,
                          has_initial_state: Tensor | None = None, activation: str | None = "silu",
                          x_cols: Tensor | None = None, bc: int = 256) -> Tensor:
    """x [N, C] one token per sequence (or [N, *] with x_cols [C] int32); conv_cache [num_slots, C, K-1] updated
    in place at state_slots [N]; has_initial_state [N] bool or None (= all true) -> y [N, C] in x.dtype.
    The kernel launched right before this one must not write conv_cache, weight, state_slots, has_initial_state or
    x_cols (they are read before the PDL wait; the GDN layer's in_proj GEMV writes only x)."""
    n, c = x.shape[0], weight.shape[0]
    w = weight.reshape(c, -1).contiguous()
    if x.stride(1) != 1 or conv_cache.stride(2) != 1:
        raise ValueError("x and conv_cache need a unit stride in their last dim")
    y = torch.empty(n, c, dtype=x.dtype, device=x.device)
    _conv_update_kernel[(n, triton.cdiv(c, bc))](
        x, x_cols if x_cols is not None else w, w, conv_cache, state_slots,
        has_initial_state if has_initial_state is not None else state_slots, y,
        c, x.stride(0), y.stride(0), conv_cache.stride(0), conv_cache.stride(1),
        KW=w.shape[1], BC=bc, BKW=triton.next_power_of_2(w.shape[1]), SILU=activation == "silu",
        HAS_COLS=x_cols is not None, HAS_INIT=has_initial_state is not None, EARLY=EARLY_STATE_LOAD, num_warps=4,
        **pdl_launch())
    return y


# ---- registry-compatible (qnext.ops.causal_conv) -----------------------------------------------------------------

def causal_conv1d(x: Tensor, weight: Tensor, initial_state: Tensor | None, cu_seqlens: Tensor | list[int],
                  activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """x [T, C]; weight [C, K]; initial_state [N, C, K-1] or None -> (y [T, C], final_state [N, C, K-1])."""
    cu = torch.as_tensor(cu_seqlens, device=x.device).to(torch.int32)
    n, c, kw = cu.shape[0] - 1, x.shape[1], weight.shape[-1]
    if initial_state is None:
        state = torch.zeros(n, c, kw - 1, dtype=x.dtype, device=x.device)
    else:
        state = initial_state.to(x.dtype).contiguous().clone()
    slots = torch.arange(n, device=x.device, dtype=torch.int32)
    init = torch.ones(n, dtype=torch.bool, device=x.device)
    y = causal_conv1d_prefill_(x, weight, state, slots, init, cu, activation)
    return y, state


def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor,
                         activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """x [N, C]; state [N, C, K-1]; weight [C, K] -> (y [N, C], new_state [N, C, K-1])."""
    new_state = state.contiguous().clone()
    slots = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
    return causal_conv1d_update_(x, weight, new_state, slots, None, activation), new_state


def register_backend(name: str) -> None:
    from qnext.ops.registry import register
    register("causal_conv1d", name)(causal_conv1d)
    register("causal_conv1d_update", name)(causal_conv1d_update)
