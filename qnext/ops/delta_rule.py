"""Gated delta rule, torch reference: token-by-token recurrence and the chunked (WY/UT) form. They agree.

Per value head, with state S in R^{Dk x Dv} (float32):
    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T (scale q_t)

Layout follows flash-linear-attention: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay, <= 0) and beta
[B, T, Hv]; Hv % Hk == 0 and value head h reads key head h // (Hv / Hk). With cu_seqlens [N+1], B must be 1 and the
T axis holds N sequences back to back; initial_state / final state are [N, Hv, Dk, Dv] float32 (N = B otherwise).
Outputs come back in v's dtype, states in float32.
gdn_prefill_ / gdn_decode_ wrap them for the GDN layer: raw gate inputs, state read from and written back to the
cache's slots (fast backends do that in place, without the gather/scatter copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.registry import register
from qnext.ops.slots import slot_states

Tensor = torch.Tensor


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """float32, key heads expanded to value heads, q scaled; all [B, T, Hv, D] / [B, T, Hv]."""
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    group = v.shape[2] // k.shape[2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q * scale, k, v, g, beta


def _initial(initial_state, n, v, dk) -> Tensor:
    if initial_state is None:
        return v.new_zeros(n, v.shape[2], dk, v.shape[3], dtype=torch.float32)
    return initial_state.float()


def _bounds(cu_seqlens, batch: int) -> list[int] | None:
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {batch}")
    return [int(c) for c in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]


def _recurrent(q, k, v, g, beta, state):
    """[B, T, H, D] float32 inputs, state [B, H, Dk, Dv] -> (o [B, T, H, Dv], final state)."""
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        update = beta[:, t, :, None] * (v[:, t] - predicted)
        state = state + k[:, t, :, :, None] * update[:, :, None, :]
        out[:, t] = torch.einsum("bhkv,bhk->bhv", state, q[:, t])
    return out, state


def _chunked(q, k, v, g, beta, state, chunk: int):
    """Same contract as _recurrent, C = chunk tokens at a time.

    Inside a chunk, with c_t = cumsum(g) from the chunk start and S0 the state before it, the values written are
    u = (I + A)^-1 (beta v - beta exp(c) K S0), A[t, s] = beta_t exp(c_t - c_s) k_t.k_s for s < t (unit lower
    triangular system, solved once per chunk for both right-hand sides). Then
    o_t = exp(c_t) S0^T q_t + sum_{s<=t} exp(c_t - c_s) (q_t.k_s) u_s and
    S_end = exp(c_C) S0 + sum_s exp(c_C - c_s) k_s u_s^T. Padding tokens (g = 0, beta = k = 0) change nothing.
    """
    b, t, h, _ = q.shape
    pad = (-t) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    n = (t + pad) // chunk
    # [B, T, H, D] -> [B, H, N, C, D]
    q, k, v = (x.transpose(1, 2).reshape(b, h, n, chunk, -1) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(b, h, n, chunk) for x in (g, beta))

    c = g.cumsum(-1)                                             # [B, H, N, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [.., C, C], t >= s
    k_beta = k * beta[..., None]
    a = (k_beta @ k.transpose(-1, -2)) * decay                   # strictly-lower part is used
    u_v = torch.linalg.solve_triangular(a, v * beta[..., None], upper=False, unitriangular=True)
    u_k = torch.linalg.solve_triangular(a, k_beta * c.exp()[..., None], upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * decay                       # [B, H, N, C, C], includes the diagonal
    q_from_start = q * c.exp()[..., None]
    k_to_end = k * (c[..., -1:] - c).exp()[..., None]
    chunk_decay = c[..., -1].exp()[..., None, None]              # [B, H, N, 1, 1]

    out = torch.empty_like(v)
    for i in range(n):
        u = u_v[:, :, i] - u_k[:, :, i] @ state                  # [B, H, C, Dv]
        out[:, :, i] = q_from_start[:, :, i] @ state + qk[:, :, i] @ u
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ u
    out = out.reshape(b, h, n * chunk, -1)[:, :, :t].transpose(1, 2)
    return out, state


def _run(core, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, **kw):
    dtype = v.dtype
    bounds = _bounds(cu_seqlens, q.shape[0])
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    if bounds is None:
        out, state = core(q, k, v, g, beta, _initial(initial_state, q.shape[0], v, k.shape[-1]), **kw)
        return out.to(dtype), state
    n = len(bounds) - 1
    states = _initial(initial_state, n, v, k.shape[-1])
    out, finals = torch.empty_like(v), []
    for i in range(n):  # prefill: one sequence at a time
        s, e = bounds[i], bounds[i + 1]
        o, st = core(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], states[i:i + 1], **kw)
        out[:, s:e] = o
        finals.append(st)
    final = torch.cat(finals) if finals else states
    return out.to(dtype), final


@register("recurrent_gated_delta_rule", "torch")
def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               cu_seqlens: Tensor | list[int] | None = None,
                               use_qk_l2norm_in_kernel: bool = False) -> tuple[Tensor, Tensor]:
    """-> (o [B, T, Hv, Dv] in v.dtype, final_state [N, Hv, Dk, Dv] float32). Batched decode: T = 1, B = N."""
    return _run(_recurrent, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel)


@register("chunk_gated_delta_rule", "torch")
def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                           scale: float | None = None, initial_state: Tensor | None = None,
                           cu_seqlens: Tensor | list[int] | None = None,
                           use_qk_l2norm_in_kernel: bool = False,
                           chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Same contract as recurrent_gated_delta_rule, computed chunk_size tokens at a time."""
    return _run(_chunked, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel,
                chunk=chunk_size)


# ---- slot-indexed entry points: what the GDN layer calls (fast backends update the cache in place) ---------------

def gdn_gates(a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Raw in_proj_ba outputs a, b [T, Hv] -> (g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)), float32."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float()), b.float().sigmoid()


@register("gdn_prefill_", "torch")
def gdn_prefill_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                 ssm_cache: Tensor, state_slots: Tensor, has_initial_state: Tensor, cu_seqlens: Tensor,
                 scale: float | None = None, chunk_size: int = 64) -> Tensor:
    """Varlen prefill chunks, state read from and written back to the cache slots.

    q, k [T, Hk, Dk]; v [T, Hv, Dv]; a, b [T, Hv] raw; A_log, dt_bias [Hv]; ssm_cache [num_slots, Hv, Dk, Dv];
    state_slots [N]; has_initial_state [N] bool (false: start from zeros); cu_seqlens [N+1] -> o [T, Hv, Dv]
    in v.dtype. q and k are L2-normalised, q scaled by `scale` (default Dk^-0.5)."""
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    slots = state_slots.long()
    o, final = chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], scale=scale,
                                      initial_state=slot_states(ssm_cache, slots, has_initial_state).float(),
                                      cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True, chunk_size=chunk_size)
    ssm_cache.index_copy_(0, slots, final.to(ssm_cache.dtype))
    return o[0]


@register("gdn_decode_", "torch")
def gdn_decode_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                ssm_cache: Tensor, state_slots: Tensor, has_initial_state: Tensor | None = None,
                cu_seqlens: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Token-by-token step(s), same arguments as gdn_prefill_; cu_seqlens None means one token per sequence
    (T = N, vectorised over sequences); has_initial_state None means all true."""
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    slots = state_slots.long()
    h0 = slot_states(ssm_cache, slots, has_initial_state).float()            # [N, Hv, Dk, Dv]
    if cu_seqlens is None:   # [N, 1, ...]: the batch axis carries the sequences
        o, final = recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                              scale=scale, initial_state=h0, use_qk_l2norm_in_kernel=True)
        o = o[:, 0]
    else:
        o, final = recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], scale=scale,
                                              initial_state=h0, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
        o = o[0]
    ssm_cache.index_copy_(0, slots, final.to(ssm_cache.dtype))
    return o
