"""Gated DeltaNet fast paths: fla-core's chunked kernel for prefill, our own fused recurrent kernel for decode.

Semantics are those of qnext.ops.delta_rule (the torch reference), per value head h with key head h // (Hv / Hk):
    S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T (q_t / sqrt(Dk)),
q and k L2-normalised (x * rsqrt(sum x^2 + 1e-6)) when asked, state S [Dk, Dv] float32.

Two API levels:
* registry-compatible (same signatures as delta_rule.py; register_backend(name) adds them to qnext.ops.registry):
    chunk_gated_delta_rule      -> fla-core chunk_gated_delta_rule (varlen cu_seqlens, initial/final state);
                                   fla handles GVA (Hv > Hk) with the same head mapping, and its in-kernel
                                   L2 norm uses the same eps (1e-6)
    recurrent_gated_delta_rule  -> our Triton kernel below (fla's fused_recurrent is kept as
                                   fla_recurrent_gated_delta_rule for comparison)
* slot-indexed, in place on the model cache (what the GDN layer should call; no gather/scatter of 2 MiB states):
    gdn_prefill_(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state, cu_seqlens)
    gdn_decode_(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state=None, cu_seqlens=None)
  taking the raw gate inputs: g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) (fused in the decode
  kernel; a few torch ops in prefill).

The decode kernel: one program per (sequence, value head, BV columns of the state); it loads its [Dk, BV] slice of
ssm_cache[state_slots[n], h] once, runs the sequence's tokens (one for decode, cu_seqlens for several), writes o and
stores the slice back in place. Reads/writes 2 x 2 MiB per layer per sequence at Hv=32, Dk=Dv=128: memory bound.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qnext.ops.pdl import pdl_launch, pdl_wait_then_release
from qnext.ops.slots import slot_states

Tensor = torch.Tensor
log = logging.getLogger(__name__)


# ---- our fused recurrent kernel ----------------------------------------------------------------------------------

@triton.jit
def _gdn_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, a_log_ptr, dt_bias_ptr, state_ptr, slots_ptr, init_ptr, cu_ptr, o_ptr,
    z_ptr, nw_ptr, ss_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_bt, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sk, stride_zt, stride_zk, stride_zr,
    scale, eps,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, GATE_IN_KERNEL: tl.constexpr, BETA_SIGMOID: tl.constexpr,
    L2NORM: tl.constexpr, EARLY: tl.constexpr = False, GATED: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """grid (N, Hv, cdiv(Dv, BV)). q/k [T, Hk, Dk], v [T, Hv, Dv], g/b [T, Hv] (raw a/b or g/beta), state
    [S, Hv, Dk, Dv] at slot slots[n]; sequence n owns tokens [cu[n], cu[n+1]) (VARLEN) or token n.
    GATED: the GDN output norm's parts that need no whole head: each program stores the sum of squares of its BV
    outputs rounded to o's dtype at ss [T, Hv, cdiv(Dv, BV)] (contiguous), then o * nw * silu(z) in place of o
    (z [T, Hk, GROUP, Dv] at the strides given, norm weight nw [Dv]); the head's rsqrt(mean square) is then one
    scale per head in out_proj's GEMV (qnext.ops.triton_linear_fp8's HEAD_RSTD).
    EARLY: the state slice (and slot, bounds, gate parameters) is loaded before the PDL wait, overlapping the
    kernel before this one; the caller guarantees that kernel writes none of them (see gdn_decode_)."""
    if not EARLY:
        pdl_wait_then_release(PDL)
    n = tl.program_id(0)
    hv = tl.program_id(1)
    pv = tl.program_id(2)
    if VARLEN:
        bos = tl.load(cu_ptr + n).to(tl.int64)
        eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    else:
        bos = n.to(tl.int64)
        eos = bos + 1
    slot = tl.load(slots_ptr + n).to(tl.int64)
    hk = hv // GROUP
    ok = tl.arange(0, BK)
    kmask = ok < DK
    ov = pv * BV + tl.arange(0, BV)
    vmask = ov < DV
    smask = kmask[:, None] & vmask[None, :]
    s_ptrs = state_ptr + slot * stride_ss + hv * stride_sh + ok[:, None] * stride_sk + ov[None, :]
    S = tl.load(s_ptrs, mask=smask, other=0).to(tl.float32)                   # [BK, BV]
    if HAS_INIT:
        init = tl.load(init_ptr + n).to(tl.int32)
        S = tl.where(init != 0, S, 0.0)
    if GATED:
        nwv = tl.load(nw_ptr + ov, mask=vmask, other=0).to(tl.float32)
    if GATE_IN_KERNEL:
        neg_a = -tl.exp(tl.load(a_log_ptr + hv).to(tl.float32))
        dtb = tl.load(dt_bias_ptr + hv).to(tl.float32)
    if EARLY:
        pdl_wait_then_release(PDL)
    for t in range(bos, eos):
        qv = tl.load(q_ptr + t * stride_qt + hk * stride_qh + ok, mask=kmask, other=0).to(tl.float32)
        kv = tl.load(k_ptr + t * stride_kt + hk * stride_kh + ok, mask=kmask, other=0).to(tl.float32)
        vv = tl.load(v_ptr + t * stride_vt + hv * stride_vh + ov, mask=vmask, other=0).to(tl.float32)
        if GATED:       # loaded with the step's other inputs, not after the math that needs it last
            zv = tl.load(z_ptr + t * stride_zt + hk * stride_zk + (hv - hk * GROUP) * stride_zr + ov, mask=vmask,
                         other=0).to(tl.float32)
        graw = tl.load(g_ptr + t * stride_gt + hv).to(tl.float32)
        braw = tl.load(b_ptr + t * stride_bt + hv).to(tl.float32)
        if GATE_IN_KERNEL:
            xa = graw + dtb
            g = neg_a * tl.where(xa > 20.0, xa, tl.log(1.0 + tl.exp(xa)))     # softplus, torch's threshold
        else:
            g = graw
        if BETA_SIGMOID:
            beta = tl.sigmoid(braw)
        else:
            beta = braw
        if L2NORM:
            qv = qv * tl.rsqrt(tl.sum(qv * qv, axis=0) + eps)
            kv = kv * tl.rsqrt(tl.sum(kv * kv, axis=0) + eps)
        qv = qv * scale
        S = S * tl.exp(g)
        pred = tl.sum(S * kv[:, None], axis=0)                                # S^T k   [BV]
        u = beta * (vv - pred)
        S = S + kv[:, None] * u[None, :]
        o = tl.sum(S * qv[:, None], axis=0)                                   # S^T q   [BV]
        o = o.to(o_ptr.dtype.element_ty)
        if GATED:
            of = o.to(tl.float32)
            tl.store(ss_ptr + (t * tl.num_programs(1) + hv) * tl.num_programs(2) + pv, tl.sum(of * of, axis=0))
            o = (of * nwv * (zv * tl.sigmoid(zv))).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + t * stride_ot + hv * stride_oh + ov, o, mask=vmask)
    tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=smask)


DECODE_BV = 32        # state columns per program below 8 sequences, 64 from 8 on (tuned by scripts/gpu_check.py)
DECODE_WARPS = 4
# gdn_decode_ loads each program's state slice before the PDL wait (the kernel's EARLY); False for A/B runs.
EARLY_STATE_LOAD = True


def _launch_recurrent(q, k, v, g, b, a_log, dt_bias, state, slots, has_init, cu, scale, *, gate_in_kernel,
                      beta_sigmoid, l2norm, num_seqs, bv=None, num_warps=None, early=False,
                      gate=None) -> tuple[Tensor, Tensor | None]:
    """q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, b [T, Hv] (any strides with a unit last dim) -> (o [T, Hv, Dv], None),
    or with gate = (z [T, Hk, Hv / Hk, Dv] with a unit last stride, norm weight [Dv]) the kernel's GATED outputs
    (o * nw * silu(z), partial sums of squares of o [T, Hv, Dv / BV] float32)."""
    t, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("state", state)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dim")
    bv = bv or min(DECODE_BV if num_seqs < 8 else 64, triton.next_power_of_2(dv))   # measured, perf-notes.md
    o = torch.empty(t, hv, dv, dtype=v.dtype, device=v.device)
    ss = torch.empty(t, hv, triton.cdiv(dv, bv), dtype=torch.float32, device=v.device) if gate else None
    z, nw = gate if gate else (o.view(t, hk, -1, dv), o)
    dummy = g
    _gdn_recurrent_kernel[(num_seqs, hv, triton.cdiv(dv, bv))](
        q, k, v, g, b, a_log if a_log is not None else dummy, dt_bias if dt_bias is not None else dummy,
        state, slots, has_init if has_init is not None else slots, cu if cu is not None else slots, o,
        z, nw, ss if ss is not None else o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), b.stride(0),
        o.stride(0), o.stride(1), state.stride(0), state.stride(1), state.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        scale, 1e-6,
        GROUP=hv // hk, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=bv,
        VARLEN=cu is not None, HAS_INIT=has_init is not None, GATE_IN_KERNEL=gate_in_kernel,
        BETA_SIGMOID=beta_sigmoid, L2NORM=l2norm, EARLY=early, GATED=gate is not None,
        num_warps=num_warps or DECODE_WARPS, **pdl_launch())
    return o, ss


def gdn_decode_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                ssm_cache: Tensor, state_slots: Tensor, has_initial_state: Tensor | None = None,
                cu_seqlens: Tensor | None = None, scale: float | None = None, **tile) -> Tensor:
    """Fused decode step, state updated in place.

    q, k [T, Hk, Dk]; v [T, Hv, Dv] (views of the conv output are fine); a, b [T, Hv] raw in_proj_ba outputs;
    A_log, dt_bias [Hv]; ssm_cache [num_slots, Hv, Dk, Dv] (float32 or bf16); state_slots [N] int;
    has_initial_state [N] bool or None (= all true); cu_seqlens [N+1] int or None (= one token per sequence, T = N)
    -> o [T, Hv, Dv] in v.dtype. q/k are L2-normalised and q scaled by `scale` (default Dk^-0.5) in the kernel.
    The state is loaded before the PDL wait (EARLY_STATE_LOAD): the kernel launched right before this one (the
    GDN layer's conv step, alone or in the in_proj GEMV's epilogue) must not write ssm_cache, the slots,
    has_initial_state, cu_seqlens, A_log or dt_bias."""
    return gdn_decode_gated_(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state, cu_seqlens,
                             scale, **tile)[0]


def gdn_decode_gated_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                      ssm_cache: Tensor, state_slots: Tensor, has_initial_state: Tensor | None = None,
                      cu_seqlens: Tensor | None = None, scale: float | None = None, gate: tuple | None = None,
                      **tile) -> tuple[Tensor, Tensor | None]:
    """gdn_decode_ -> (o, None), or with gate = (z, norm weight) the GDN output norm's per-element part
    (o * w * silu(z) in o's dtype, o rounded first) and each head's partial sums of squares of o [T, Hv, P]
    float32, P programs per head: what out_proj's GEMV needs to finish the norm with one scale per head
    (qnext.ops.triton_fused_linear.gdn_decode_project_)."""
    n = state_slots.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _launch_recurrent(q, k, v, a, b, A_log, dt_bias, ssm_cache, state_slots, has_initial_state, cu_seqlens,
                             scale, gate_in_kernel=True, beta_sigmoid=True, l2norm=True, num_seqs=n,
                             early=EARLY_STATE_LOAD, gate=gate, **tile)


def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               cu_seqlens: Tensor | list[int] | None = None,
                               use_qk_l2norm_in_kernel: bool = False) -> tuple[Tensor, Tensor]:
    """Registry-compatible (qnext.ops.delta_rule): q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]
    -> (o [B, T, Hv, Dv] v.dtype, final_state [N, Hv, Dk, Dv] float32). Our kernel, state copied then updated."""
    bsz, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    if cu_seqlens is not None:
        if bsz != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {bsz}")
        cu = torch.as_tensor(cu_seqlens, device=q.device).to(torch.int32)
    else:
        cu = None if t == 1 else torch.arange(0, bsz * t + 1, t, device=q.device, dtype=torch.int32)
    n = bsz if cu is None else cu.shape[0] - 1
    if initial_state is None:
        state = torch.zeros(n, hv, dk, dv, dtype=torch.float32, device=q.device)
    else:
        state = initial_state.float().contiguous().clone()
    slots = torch.arange(n, device=q.device, dtype=torch.int32)
    scale = dk ** -0.5 if scale is None else scale
    flat = lambda x: x.reshape(bsz * t, *x.shape[2:])                         # noqa: E731
    o, _ = _launch_recurrent(flat(q), flat(k), flat(v), flat(g).float(), flat(beta).float(), None, None, state,
                             slots, None, cu, scale, gate_in_kernel=False, beta_sigmoid=False,
                             l2norm=use_qk_l2norm_in_kernel, num_seqs=n)
    return o.view(bsz, t, hv, dv), state


# ---- fla-core ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _fla():
    """fla-core's (chunk, fused_recurrent), or None when it is not installed (`pip install qnext[gpu]`)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as rec
    except ImportError as e:
        log.warning("fla-core not importable (%s): GDN prefill falls back to the torch chunked reference", e)
        return None
    return chunk, rec


_last_bounds: list = [None, None]   # [cu_seqlens given last, its int64 copy on the device]


def _int64_bounds(cu_seqlens: Tensor | list[int], device: torch.device) -> Tensor:
    """cu_seqlens as int64 on `device`, the same tensor object for the same input object.

    fla memoises its chunk indices per cu_seqlens *object* (fla.utils.tensor_cache, identity keyed) and computing
    them reads the lengths on the host (a device sync). A fresh .long() copy in each of the 36 GDN layers would
    miss that cache and sync 36 times per prefill step; one batch's cu_query_lens object maps to one copy here."""
    if not torch.is_tensor(cu_seqlens):  # a list may change in place: no memo
        return torch.as_tensor(cu_seqlens, device=device).long()
    if _last_bounds[0] is not cu_seqlens:
        _last_bounds[:] = [cu_seqlens, cu_seqlens.to(device, torch.int64)]
    return _last_bounds[1]


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                           scale: float | None = None, initial_state: Tensor | None = None,
                           cu_seqlens: Tensor | list[int] | None = None,
                           use_qk_l2norm_in_kernel: bool = False,
                           chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Registry-compatible (qnext.ops.delta_rule), through fla-core's chunk kernel (chunk_size 16/32/64); the torch
    chunked reference when fla-core is missing (correct, slow)."""
    if _fla() is None:
        from qnext.ops import delta_rule
        return delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                                 cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                                 chunk_size=chunk_size)
    chunk, _ = _fla()
    if cu_seqlens is not None:
        cu_seqlens = _int64_bounds(cu_seqlens, q.device)
    # beta in q's dtype as fla's own tests and callers pass it (bf16 keeps ~3 digits; g stays float32)
    o, final = chunk(q, k, v, g.float(), beta.to(q.dtype), scale=scale,
                     initial_state=None if initial_state is None else initial_state.float(),
                     output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                     cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    return o.to(v.dtype), final


def fla_recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                                   scale: float | None = None, initial_state: Tensor | None = None,
                                   cu_seqlens: Tensor | list[int] | None = None,
                                   use_qk_l2norm_in_kernel: bool = False) -> tuple[Tensor, Tensor]:
    """Registry-compatible, through fla-core's fused_recurrent (no state slots: gather/scatter stays outside)."""
    if _fla() is None:
        raise ImportError("fla_recurrent_gated_delta_rule needs fla-core (pip install qnext[gpu])")
    _, rec = _fla()
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, device=q.device).long()
    o, final = rec(q, k, v, g=g.float(), beta=beta.float(), scale=scale,        # keywords: 4th positional is gk
                   initial_state=None if initial_state is None else initial_state.float(),
                   output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens)
    return o.to(v.dtype), final


def gdn_gates(a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """a, b [T, Hv] -> (g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)), both float32."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


def gdn_prefill_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                 ssm_cache: Tensor, state_slots: Tensor, has_initial_state: Tensor, cu_seqlens: Tensor,
                 scale: float | None = None, chunk_size: int = 64) -> Tensor:
    """Varlen prefill chunk through fla, state read from / written back to the cache slots.

    q, k [T, Hk, Dk]; v [T, Hv, Dv]; a, b [T, Hv] raw; ssm_cache [num_slots, Hv, Dk, Dv]; state_slots [N];
    has_initial_state [N] bool; cu_seqlens [N+1] -> o [T, Hv, Dv] in v.dtype."""
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    slots = state_slots.long()
    h0 = slot_states(ssm_cache, slots, has_initial_state).float()
    o, final = chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], scale=scale,
                                      initial_state=h0, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
                                      chunk_size=chunk_size)
    ssm_cache.index_copy_(0, slots, final.to(ssm_cache.dtype))
    return o[0]


def register_backend(name: str) -> None:
    """Add this module's registry-compatible ops to qnext.ops.registry under backend `name`."""
    from qnext.ops.registry import register
    register("chunk_gated_delta_rule", name)(chunk_gated_delta_rule)
    register("recurrent_gated_delta_rule", name)(recurrent_gated_delta_rule)
