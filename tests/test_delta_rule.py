"""Gated delta rule reference: chunked (WY/UT) form == token recurrence == transformers' recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qnext.ops.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

HK, HV, DK, DV = 2, 6, 12, 20  # GVA 1:3, odd head dims


def inputs(b: int, t: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = randn(b, t, HK, DK), randn(b, t, HK, DK)
    v = randn(b, t, HV, DV)
    g = F.logsigmoid(randn(b, t, HV) + 2.0)      # log decay in (-inf, 0), mostly mild
    beta = torch.sigmoid(randn(b, t, HV))
    h0 = randn(b, HV, DK, DV)
    return [x.to(dtype) for x in (q, k, v)] + [g, beta, h0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("t", [1, 5, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(t, with_state):
    q, k, v, g, beta, h0 = inputs(2, t, seed=t)
    h0 = h0 if with_state else None
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    o_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    assert o_c.shape == (2, t, HV, DV) and s_c.shape == (2, HV, DK, DV) and s_c.dtype == torch.float32
    assert rel(o_c, o_r) < 1e-5 and rel(s_c, s_r) < 1e-5


def test_matches_transformers_recurrence():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, h0 = inputs(1, 77, seed=1)
    group = HV // HK
    o_ref, s_ref = torch_recurrent_gated_delta_rule(
        q.repeat_interleave(group, 2), k.repeat_interleave(group, 2), v, g, beta, initial_state=h0,
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_without_l2norm_and_custom_scale_and_chunk():
    q, k, v, g, beta, h0 = inputs(1, 45, seed=2)
    k = F.normalize(k, dim=-1)
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0)
    o_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, chunk_size=16)
    assert rel(o_c, o_r) < 1e-5 and rel(s_c, s_r) < 1e-5


def test_state_carries_across_calls():
    """Running [0, 70) then [70, 131) with the state in between == running [0, 131) at once."""
    q, k, v, g, beta, h0 = inputs(1, 131, seed=3)
    kw = dict(use_qk_l2norm_in_kernel=True)
    o_all, s_all = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)
    cut = 70
    o1, s1 = chunk_gated_delta_rule(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut],
                                    initial_state=h0, **kw)
    o2, s2 = chunk_gated_delta_rule(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:],
                                    initial_state=s1, **kw)
    assert rel(torch.cat((o1, o2), 1), o_all) < 1e-5 and rel(s2, s_all) < 1e-5
    # and token by token through the recurrent form (the decode path)
    s, outs = s1, []
    for i in range(cut, 131):
        o, s = recurrent_gated_delta_rule(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g[:, i:i + 1],
                                          beta[:, i:i + 1], initial_state=s, **kw)
        outs.append(o)
    assert rel(torch.cat(outs, 1), o2) < 1e-5 and rel(s, s_all) < 1e-5


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_varlen_equals_separate_sequences(fn):
    lengths = [3, 64, 1, 97]
    q, k, v, g, beta, _ = inputs(1, sum(lengths), seed=4)
    h0 = inputs(len(lengths), 1, seed=5)[-1]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    o, s = fn(q, k, v, g, beta, initial_state=h0, cu_seqlens=torch.tensor(cu), use_qk_l2norm_in_kernel=True)
    assert s.shape == (len(lengths), HV, DK, DV)
    for i in range(len(lengths)):
        a, e = cu[i], cu[i + 1]
        o_i, s_i = recurrent_gated_delta_rule(q[:, a:e], k[:, a:e], v[:, a:e], g[:, a:e], beta[:, a:e],
                                              initial_state=h0[i:i + 1], use_qk_l2norm_in_kernel=True)
        assert rel(o[:, a:e], o_i) < 1e-5 and rel(s[i:i + 1], s_i) < 1e-5


def test_batched_decode_is_per_sequence():
    q, k, v, g, beta, h0 = inputs(5, 1, seed=6)
    o, s = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    for i in range(5):
        o_i, s_i = recurrent_gated_delta_rule(q[i:i + 1], k[i:i + 1], v[i:i + 1], g[i:i + 1], beta[i:i + 1],
                                              initial_state=h0[i:i + 1], use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(o[i:i + 1], o_i)
        torch.testing.assert_close(s[i:i + 1], s_i)


def test_bfloat16_inputs_keep_float32_state():
    q, k, v, g, beta, h0 = inputs(1, 70, seed=7, dtype=torch.bfloat16)
    o_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    assert o_c.dtype == torch.bfloat16 and s_c.dtype == torch.float32
    assert rel(o_c, o_r) < 1e-2 and rel(s_c, s_r) < 1e-5


def test_slot_indexed_prefill_and_decode_update_the_cache_in_place():
    """gdn_prefill_ / gdn_decode_ == gates + the plain rule over gathered states, written back to the slots only."""
    from qnext.ops.delta_rule import gdn_decode_, gdn_gates, gdn_prefill_

    lengths, slots = [5, 70, 2], torch.tensor([4, 0, 2])
    has_init = torch.tensor([True, False, True])
    g_ = torch.Generator().manual_seed(8)
    t = sum(lengths)
    q, k = torch.randn(t, HK, DK, generator=g_), torch.randn(t, HK, DK, generator=g_)
    v, a, b = torch.randn(t, HV, DV, generator=g_), torch.randn(t, HV, generator=g_), torch.randn(t, HV, generator=g_)
    A_log, dt_bias = torch.randn(HV, generator=g_) * 0.5 - 1, torch.randn(HV, generator=g_) * 0.5
    cache = torch.randn(6, HV, DK, DV, generator=g_)
    before = cache.clone()
    cu = torch.tensor([0, 5, 75, 77])

    o = gdn_prefill_(q, k, v, a, b, A_log, dt_bias, cache, slots, has_init, cu)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    h0 = before[slots] * has_init.view(-1, 1, 1, 1)
    o_ref, s_ref = recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], initial_state=h0,
                                              cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    assert rel(o, o_ref[0]) < 1e-5 and rel(cache[slots], s_ref) < 1e-5
    untouched = torch.tensor([1, 3, 5])
    assert torch.equal(cache[untouched], before[untouched])

    # one decode token per sequence, vectorised, continuing from the prefilled slots
    qd, kd = torch.randn(3, HK, DK, generator=g_), torch.randn(3, HK, DK, generator=g_)
    vd, ad, bd = torch.randn(3, HV, DV, generator=g_), torch.randn(3, HV, generator=g_), torch.randn(3, HV, generator=g_)
    after_prefill = cache.clone()
    od = gdn_decode_(qd, kd, vd, ad, bd, A_log, dt_bias, cache, slots)
    gd, betad = gdn_gates(ad, bd, A_log, dt_bias)
    od_ref, sd_ref = recurrent_gated_delta_rule(qd[:, None], kd[:, None], vd[:, None], gd[:, None], betad[:, None],
                                                initial_state=after_prefill[slots], use_qk_l2norm_in_kernel=True)
    assert rel(od, od_ref[:, 0]) < 1e-5 and rel(cache[slots], sd_ref) < 1e-5
