"""RMSNorm kernels (Triton): one launch per norm, the residual add fused in. Semantics of qnext.ops.norm.
The rotary embedding's cos / sin come from one launch too (rope_cos_sin; torch takes six).

One program per row of D elements (per several rows for prefill-sized inputs); rows are addressed through up to
three leading strides, so strided views (q/k heads split out of a projection, the GDN gate z inside in_proj_qkvz's
output) are read where they lie, without a copy. Outputs are new contiguous tensors (never aliasing an input, so
CUDA-graph capture needs no care).
A MoeCombine input (a MoE block's routed outputs, shared-expert gate and shared output) is formed in the same
launch, with the rounding of qnext.ops.triton_ffn.sigmoid_gate_add, so the result is that kernel's and this one's
bit for bit, one launch fewer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.ops.norm import MoeCombine
from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.triton_ffn import sigmoid_gate_add

Tensor = torch.Tensor


@triton.jit
def _norm_kernel(
    x_ptr, r_ptr, z_ptr, w_ptr, y_ptr, s_ptr, cos_ptr, sin_ptr, mg_ptr, ms_ptr,
    NROWS, B, C, D, sx0, sx1, sx2, sr0, sr1, sr2, sz0, sz1, sz2, smg, eps,
    HAS_RES: tl.constexpr, GATED: tl.constexpr, HALF: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr = 0,
    RB: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    """grid (cdiv(rows, RB),): RB rows per program, row = (i0, i1, i2) over leading dims [A, B, C]; y and s are
    contiguous [rows, D]. Each row is reduced on its own.
    HALF > 0: rotary embedding after the norm, token i1 (x is [T, H, D]), cos/sin [T, HALF].
    KC > 0: x is a MoeCombine's routed [T, KC, D] (contiguous; x_ptr), its row sum plus sigmoid(gate) * shared
    (gate mg_ptr, stride smg per row; shared ms_ptr [T, D] contiguous), rounded to the dtype of s."""
    pdl_wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    rm = row < NROWS
    i0, i1, i2 = row // (B * C), (row // C) % B, row % C
    offs = tl.arange(0, BD)
    m = rm[:, None] & (offs < D)[None, :]
    flat = row[:, None] * D + offs[None, :]                            # [RB, BD] in y / s (contiguous rows)
    xrow = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    if KC > 0:      # as _gate_add_kernel: float32 sum over k in order, then + sigmoid(gate) * shared, one rounding
        gate = tl.sigmoid(tl.load(mg_ptr + row * smg, mask=rm, other=0.0).to(tl.float32))
        acc = tl.zeros([RB, BD], dtype=tl.float32)
        for j in tl.static_range(KC):
            acc += tl.load(x_ptr + (row[:, None] * KC + j) * D + offs[None, :], mask=m, other=0.0).to(tl.float32)
        shared = tl.load(ms_ptr + flat, mask=m, other=0.0).to(tl.float32)
        x = (acc + gate[:, None] * shared).to(s_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + xrow + offs[None, :], mask=m, other=0.0)
    if HAS_RES:  # s = x + residual, rounded to x's dtype as a plain tensor add does
        r = tl.load(r_ptr + (i0 * sr0 + i1 * sr1 + i2 * sr2)[:, None] + offs[None, :], mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + flat, x, mask=m)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
    if GATED:
        z = tl.load(z_ptr + (i0 * sz0 + i1 * sz1 + i2 * sz2)[:, None] + offs[None, :], mask=m,
                    other=0.0).to(tl.float32)
        y = xf * rstd * w * (z * tl.sigmoid(z))
    else:
        y = xf * rstd * (1.0 + w)
    if HALF > 0:
        y = _rotate_normed(y, x_ptr + xrow, w_ptr, y_ptr, cos_ptr + i1[:, None] * HALF, sin_ptr + i1[:, None] * HALF,
                           rstd, rm[:, None], offs, HALF)
    tl.store(y_ptr + flat, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotate_normed(y, x_rows, w_ptr, y_ptr, cos_rows, sin_rows, rstd, rows_ok, offs, HALF: tl.constexpr):
    """The rotary embedding of normed rows y [R, BD] (float32, zero-centred weight): the pair partner of dim
    i < 2*HALF is i +- HALF, loaded from x_rows (each row's pointer, [R, 1]) and normalised too (same row, same
    rstd), both rounded to y_ptr's dtype first, as the norm's output is before a separate rotary op; cos_rows /
    sin_rows: each row's [HALF] cos / sin; rows_ok [R, 1] the rows to load."""
    rot = offs < 2 * HALF
    first = offs < HALF
    p = tl.where(first, offs + HALF, offs - HALF)
    rot2 = rows_ok & rot[None, :]
    xp = tl.load(x_rows + p[None, :], mask=rot2, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + p, mask=rot, other=0.0).to(tl.float32)[None, :]
    yp = (xp * rstd * (1.0 + wp)).to(y_ptr.dtype.element_ty).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
    j = tl.where(first, offs, offs - HALF)
    c = tl.load(cos_rows + j[None, :], mask=rot2, other=1.0)
    sn = tl.load(sin_rows + j[None, :], mask=rot2, other=0.0)
    return tl.where(rot[None, :], tl.where(first[None, :], y * c - yp * sn, y * c + yp * sn), y)


def _rows(t: Tensor) -> tuple[Tensor, list[int], list[int]]:
    """t [..., D] -> (t, leading shape padded to 3 dims, their strides); copies only when the last dim is strided
    or there are more than 3 leading dims."""
    if t.stride(-1) != 1 or t.dim() > 4:
        t = t.contiguous().view(-1, t.shape[-1]) if t.dim() > 4 else t.contiguous()
    lead, strides = list(t.shape[:-1]), list(t.stride()[:-1])
    while len(lead) < 3:
        lead.insert(0, 1)
        strides.insert(0, 0)
    return t, lead, strides


def _num_warps(d: int) -> int:
    return 8 if d >= 2048 else 4 if d >= 512 else 2 if d >= 256 else 1


# Rows per program: one for decode-sized launches (more programs, less latency); for prefill-sized ones (8K tokens
# x 32 GDN heads of 128 = 262K rows) enough rows that a program moves ~4K elements instead of one 128-wide row.
MANY_ROWS = 4096
ROW_ELEMS = 4096


def _rows_per_program(rows: int, d: int) -> int:
    return 1 if rows < MANY_ROWS else max(1, ROW_ELEMS // triton.next_power_of_2(d))


def _launch(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None, z: Tensor | None,
            rope: tuple[Tensor, Tensor] | None = None, combine: MoeCombine | None = None):
    """combine: x is formed from it (x itself is then its shared output, for the shapes)."""
    if residual is not None and residual.shape != x.shape or z is not None and z.shape != x.shape:
        raise ValueError(f"norm inputs differ in shape: x {tuple(x.shape)}, "
                         f"{'residual' if residual is not None else 'z'} "
                         f"{tuple((residual if residual is not None else z).shape)}")
    d = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else y
    if x.numel() == 0:
        return y, s
    x, lead, sx = _rows(x)
    r, _, sr = _rows(residual) if residual is not None else (x, None, [0, 0, 0])
    g, _, sz = _rows(z) if z is not None else (x, None, [0, 0, 0])
    cos, sin = (c.float().contiguous() for c in rope) if rope is not None else (weight, weight)
    kc, mg, ms, smg = 0, x, x, 0
    if combine is not None:
        routed = combine.routed.contiguous()
        kc = routed.shape[1] if routed.dim() == 3 else 1
        x, mg, ms, smg = routed, combine.gate, combine.shared.contiguous(), combine.gate.stride(0)
    rows = lead[0] * lead[1] * lead[2]
    rb = 1 if kc else _rows_per_program(rows, d)
    _norm_kernel[(triton.cdiv(rows, rb),)](
        x, r, g, weight, y, s, cos, sin, mg, ms, rows, lead[1], lead[2], d, *sx, *sr, *sz, smg, eps,
        HAS_RES=residual is not None, GATED=z is not None, HALF=cos.shape[-1] if rope is not None else 0,
        BD=triton.next_power_of_2(d), KC=kc, RB=rb, num_warps=_num_warps(d * rb), **pdl_launch())
    return y, s


def rmsnorm(x: Tensor | MoeCombine, weight: Tensor, eps: float,
            residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """x [..., D] (any strides) or a MoeCombine [T, D]; weight [D]; residual like x or None -> y, or
    (y, x + residual)."""
    if isinstance(x, MoeCombine):
        if residual is None or x.shared.dim() != 2:     # (the model always passes a residual here)
            x = sigmoid_gate_add(*x)
        else:
            return _launch(x.shared, weight, eps, residual, None, combine=x)
    y, s = _launch(x, weight, eps, residual, None)
    return y if residual is None else (y, s)


def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x, z [..., D] of one shape (any strides); weight [D] -> w * rmsnorm(x) * silu(z) in x.dtype."""
    return _launch(x, weight, eps, None, z)[0]


def rmsnorm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D] (any strides); weight [D]; cos, sin [T, R/2] -> rotary(rmsnorm(x)) in x.dtype."""
    if x.dim() != 3 or cos.shape[0] != x.shape[0] or 2 * cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"rmsnorm_rope: x {tuple(x.shape)} must be [T, H, D] and cos {tuple(cos.shape)} [T, <=D/2]")
    return _launch(x, weight, eps, None, None, (cos, sin))[0]


@triton.jit
def _rope_norm_pair_kernel(q_ptr, wq_ptr, yq_ptr, k_ptr, wk_ptr, yk_ptr, cos_ptr, sin_ptr, HQ, HK,
                           sq0, sq1, sk0, sk1, D, eps, HALF: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr = False):
    """grid (T, HQ + HK): head h of token t, a query head (h < HQ, q [T, HQ, D] -> yq) or a key head (k -> yk),
    each with its own weight: _norm_kernel's RB = 1, HALF > 0 rows with the same operations in the same order
    (yq and yk share q's dtype)."""
    pdl_wait_then_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if h < HQ:
        x_row, w_ptr, y_row = q_ptr + t * sq0 + h * sq1, wq_ptr, yq_ptr + (t * HQ + h) * D
    else:
        x_row, w_ptr, y_row = k_ptr + t * sk0 + (h - HQ) * sk1, wk_ptr, yk_ptr + (t * HK + h - HQ) * D
    offs = tl.arange(0, BD)
    m = (offs < D)[None, :]
    x = tl.load(x_row + offs[None, :], mask=m, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    y = xf * rstd * (1.0 + tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :])
    y = _rotate_normed(y, x_row, w_ptr, yq_ptr, cos_ptr + t * HALF, sin_ptr + t * HALF, rstd, m, offs, HALF)
    tl.store(y_row + offs[None, :], y.to(yq_ptr.dtype.element_ty), mask=m)


def rmsnorm_rope_pair(q: Tensor, wq: Tensor, k: Tensor, wk: Tensor, eps: float, cos: Tensor,
                      sin: Tensor) -> tuple[Tensor, Tensor]:
    """(rmsnorm_rope(q, wq, ...), rmsnorm_rope(k, wk, ...)): one launch for decode-sized q, k [T, H, D] of one dtype
    and head size with unit last strides (the attention layer's heads, views of its projection), else two."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if (k.dim() != 3 or k.shape[0] != t or k.shape[2] != d or k.dtype != q.dtype or q.stride(2) != 1
            or k.stride(2) != 1 or t * (hq + hk) >= MANY_ROWS or cos.shape[0] != t or 2 * cos.shape[-1] > d):
        return rmsnorm_rope(q, wq, eps, cos, sin), rmsnorm_rope(k, wk, eps, cos, sin)
    yq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    yk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        _rope_norm_pair_kernel[(t, hq + hk)](q, wq, yq, k, wk, yk, cos, sin, hq, hk, q.stride(0), q.stride(1),
                                             k.stride(0), k.stride(1), d, eps, HALF=cos.shape[-1],
                                             BD=triton.next_power_of_2(d), num_warps=_num_warps(d), **pdl_launch())
    return yq, yk


@triton.jit
def _rope_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, T, scaling, HALF: tl.constexpr, BH: tl.constexpr,
                 RB: tl.constexpr, PDL: tl.constexpr = False):
    """grid (cdiv(T, RB),): cos / sin [T, HALF] of position x inv_freq, times scaling, in float32 (tl.cos / tl.sin
    lower to libdevice's cosf / sinf on NVIDIA, the same code as a no-fast-math CUDA cosf; no .approx)."""
    pdl_wait_then_release(PDL)
    t = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    j = tl.arange(0, BH)
    m = (t < T)[:, None] & (j < HALF)[None, :]
    angle = tl.load(pos_ptr + t, mask=t < T, other=0).to(tl.float32)[:, None] * \
        tl.load(inv_ptr + j, mask=j < HALF, other=0.0)[None, :]
    out = t[:, None] * HALF + j[None, :]
    tl.store(cos_ptr + out, tl.cos(angle) * scaling, mask=m)
    tl.store(sin_ptr + out, tl.sin(angle) * scaling, mask=m)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """positions [T] int, inv_freq [R/2] float32 -> (cos, sin) each [T, R/2] float32, times scaling."""
    t, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty(t, half, dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    if t:
        rb = 1 if t < MANY_ROWS else 32
        _rope_kernel[(triton.cdiv(t, rb),)](positions, inv_freq.float().contiguous(), cos, sin, t, scaling,
                                            HALF=half, BH=triton.next_power_of_2(half), RB=rb, num_warps=1,
                                            **pdl_launch())
    return cos, sin
