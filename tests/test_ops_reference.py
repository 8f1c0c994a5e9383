"""Reference ops over odd sizes: causal conv with state, paged attention, the registry; ForwardBatch / ModelCache."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from qnext.cache.model_cache import ModelCache
from qnext.config import ModelConfig
from qnext.engine.forward_batch import ForwardBatch
from qnext.model.state import conv_state_shape, kv_cache_shape, ssm_state_shape
from qnext.ops import available, get_op, resolve_backend
from qnext.ops.causal_conv import causal_conv1d, causal_conv1d_update
from qnext.ops.paged_attention import paged_attention


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- causal conv -----------------------------------------------------------------------------------
def conv_oracle(x, w, state):
    """x [L, C], w [C, K], state [C, K-1] -> silu(causal conv) [L, C] via a plain padded conv."""
    full = torch.cat((state, x.t()), dim=1)[None]
    return F.silu(F.conv1d(full, w[:, None, :], groups=w.shape[0]))[0].t()


@pytest.mark.parametrize("kernel", [4, 3])
def test_causal_conv_varlen_with_state(kernel):
    c, lengths = 37, [1, 2, 9, 40]
    g = gen(kernel)
    x = torch.randn(sum(lengths), c, generator=g)
    w = torch.randn(c, kernel, generator=g)
    h0 = torch.randn(len(lengths), c, kernel - 1, generator=g)
    cu = torch.tensor([0, 1, 3, 12, 52])
    y, final = causal_conv1d(x, w, h0, cu)
    for i in range(len(lengths)):
        s, e = cu[i].item(), cu[i + 1].item()
        torch.testing.assert_close(y[s:e], conv_oracle(x[s:e], w, h0[i]))
        window = torch.cat((h0[i], x[s:e].t()), dim=1)
        torch.testing.assert_close(final[i], window[:, -(kernel - 1):])
    y0, _ = causal_conv1d(x, w, None, cu)  # no state = zeros
    torch.testing.assert_close(y0[3:12], conv_oracle(x[3:12], w, torch.zeros(c, kernel - 1)))


def test_causal_conv_chunks_and_update_continue_the_sequence():
    c, k, n = 29, 4, 23
    g = gen(1)
    x = torch.randn(n, c, generator=g)
    w = torch.randn(c, k, generator=g)
    y_all, s_all = causal_conv1d(x, w, None, [0, n])
    y1, s1 = causal_conv1d(x[:10], w, None, [0, 10])
    y2, s2 = causal_conv1d(x[10:20], w, s1, [0, 10])
    state, steps = s2, []
    for i in range(20, n):  # decode: one token at a time
        y, state = causal_conv1d_update(x[i:i + 1], state, w)
        steps.append(y)
    torch.testing.assert_close(torch.cat((y1, y2, *steps)), y_all)
    torch.testing.assert_close(state, s_all)


def test_causal_conv_update_is_batched():
    c, k, b = 19, 4, 5
    g = gen(2)
    x, w, st = torch.randn(b, c, generator=g), torch.randn(c, k, generator=g), torch.randn(b, c, k - 1, generator=g)
    y, new = causal_conv1d_update(x, st, w)
    for i in range(b):
        torch.testing.assert_close(y[i], conv_oracle(x[i:i + 1], w, st[i])[0])
        torch.testing.assert_close(new[i], torch.cat((st[i], x[i:i + 1].t()), 1)[:, 1:])


# ---- paged attention -------------------------------------------------------------------------------
HQ, HKV, D, BS = 6, 2, 20, 8


def dense_oracle(q, k, v, context, scale):
    """q [n, Hq, D] at positions context..context+n-1; k, v [context+n, Hkv, D] -> [n, Hq, D]."""
    group = HQ // HKV
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(context, context + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_paged(steps_specs, seed=0):
    """Sequences with shuffled pages; specs [(context, q_len)] per sequence. Returns (out, oracle per seq)."""
    g = gen(seed)
    num_blocks = 64
    k_cache, v_cache = torch.zeros(num_blocks, BS, HKV, D), torch.zeros(num_blocks, BS, HKV, D)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, full_k, full_v = [], [], []
    for i, (ctx, n) in enumerate(steps_specs):
        pages = perm[i * 8:(i + 1) * 8]  # 64 tokens of room, scattered pages
        tables.append(pages)
        kk, vv = torch.randn(ctx + n, HKV, D, generator=g), torch.randn(ctx + n, HKV, D, generator=g)
        for p in range(ctx):  # the context is already in the cache
            k_cache[pages[p // BS], p % BS], v_cache[pages[p // BS], p % BS] = kk[p], vv[p]
        full_k.append(kk)
        full_v.append(vv)
    batch = ForwardBatch.build([[0] * n for _, n in steps_specs], [c for c, _ in steps_specs], tables,
                               list(range(len(steps_specs))), BS)
    q = torch.randn(batch.num_tokens, HQ, D, generator=g)
    new_k = torch.cat([kk[c:] for kk, (c, _) in zip(full_k, steps_specs)])
    new_v = torch.cat([vv[c:] for vv, (c, _) in zip(full_v, steps_specs)])
    scale = D ** -0.5
    out = paged_attention(q, new_k, new_v, k_cache, v_cache, slot_mapping=batch.slot_mapping,
                          block_tables=batch.block_tables, seq_lens=batch.seq_lens, query_lens=batch.query_lens,
                          context_lens=batch.context_lens, scale=scale)
    start = 0
    for i, (ctx, n) in enumerate(steps_specs):
        ref = dense_oracle(q[start:start + n], full_k[i], full_v[i], ctx, scale)
        torch.testing.assert_close(out[start:start + n], ref, rtol=1e-5, atol=1e-5)
        for p in range(ctx + n):  # every token of the sequence is now in its pages
            torch.testing.assert_close(k_cache[tables[i][p // BS], p % BS], full_k[i][p])
        start += n


def test_paged_attention_mixed_prefill_chunks_and_decodes():
    run_paged([(0, 13), (5, 1), (17, 9), (0, 1), (30, 1), (8, 33)], seed=1)


def test_paged_attention_batched_decode():
    run_paged([(0, 1), (6, 1), (41, 1), (15, 1), (8, 1)], seed=2)


def test_paged_attention_decode_ignores_stale_pages():
    """Padding and unwritten slots past seq_len may hold anything, even NaN: the result must not change."""
    specs = [(3, 1), (20, 1)]
    g = gen(3)
    k_cache, v_cache = torch.full((8, BS, HKV, D), float("nan")), torch.full((8, BS, HKV, D), float("nan"))
    tables = [[5], [1, 6, 2]]
    batch = ForwardBatch.build([[0], [0]], [3, 20], tables, [0, 1], BS)
    for cache in (k_cache, v_cache):
        for i, (ctx, _) in enumerate(specs):
            for p in range(ctx):
                cache[tables[i][p // BS], p % BS] = torch.randn(HKV, D, generator=g)
    q, k, v = (torch.randn(2, h, D, generator=g) for h in (HQ, HKV, HKV))
    out = paged_attention(q, k, v, k_cache, v_cache, slot_mapping=batch.slot_mapping,
                          block_tables=batch.block_tables, seq_lens=batch.seq_lens, query_lens=batch.query_lens,
                          context_lens=batch.context_lens, scale=0.2)
    assert torch.isfinite(out).all()


# ---- registry ---------------------------------------------------------------------------------------
def test_registry_resolves_torch_on_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="qnext.ops.registry"):
        assert resolve_backend("auto", "cpu") == "torch"
    assert get_op("paged_attention", "auto", torch.device("cpu")) is paged_attention
    assert get_op("causal_conv1d_update", "torch") is causal_conv1d_update
    for op in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv1d"):
        assert "torch" in available(op)
    with pytest.raises(ValueError):
        resolve_backend("no-such-backend", "cpu")
    with pytest.raises(KeyError):
        get_op("no_such_op", "torch")


# ---- ForwardBatch, ModelCache, state shapes --------------------------------------------------------
def test_forward_batch_build():
    b = ForwardBatch.build([[5, 6, 7], [8]], [0, 10], [[3, 9], [1, 4]], [2, 0], block_size=8)
    assert b.query_lens == [3, 1] and b.context_lens == [0, 10] and not b.is_decode
    assert b.positions.tolist() == [0, 1, 2, 10]
    assert b.slot_mapping.tolist() == [24, 25, 26, 4 * 8 + 2]
    assert b.cu_query_lens.tolist() == [0, 3, 4] and b.cu_query_lens.dtype == torch.int32
    assert b.seq_lens.tolist() == [3, 11] and b.logits_indices.tolist() == [2, 3]
    assert b.has_initial_state.tolist() == [False, True] and b.state_slots.tolist() == [2, 0]
    d = b.next_decode([11, 12])
    assert d.is_decode and d.context_lens == [3, 11] and d.slot_mapping.tolist() == [27, 4 * 8 + 3]
    p = ForwardBatch.for_prompts([[1] * 5, [2] * 20], block_size=8, max_len=30)
    assert p.block_tables.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and p.state_slots.tolist() == [0, 1]
    with pytest.raises(ValueError):
        ForwardBatch.build([[1] * 9], [0], [[0]], [0], block_size=8)


def test_model_cache_shapes_and_state_copy(hf_config_dict):
    cfg = ModelConfig.from_hf(hf_config_dict)
    cache = ModelCache(cfg, num_blocks=7, block_size=16, num_slots=3, dtype="bfloat16")
    assert set(cache.kv) == set(cfg.attention_layer_ids) and set(cache.ssm) == set(cfg.linear_layer_ids)
    assert cache.kv[2][0].shape == kv_cache_shape(cfg, 7, 16) == (7, 16, 2, 32)
    assert cache.conv[0].shape == conv_state_shape(cfg, 3) == (3, cfg.conv_dim, 3)
    assert cache.ssm[0].shape == ssm_state_shape(cfg, 3) == (3, 4, 16, 24) and cache.ssm[0].dtype == torch.float32
    cache.ssm[0][1].fill_(2.0)
    cache.conv[3][1].fill_(3.0)
    cache.copy_state([1], [2])
    assert (cache.ssm[0][2] == 2).all() and (cache.conv[3][2] == 3).all()
    cache.zero_state([1, 2])
    assert (cache.ssm[0] == 0).all() and (cache.conv[3] == 0).all()


def test_registry_backend_module_by_function_names(monkeypatch):
    """A backend module provides ops by defining functions named after them; missing ops fall back to torch."""
    import sys
    import types

    from qnext.ops import registry

    module = types.ModuleType("fake_backend_for_test")
    module.paged_attention = lambda *a, **k: "fake"
    monkeypatch.setitem(sys.modules, "fake_backend_for_test", module)
    monkeypatch.setitem(registry.BACKEND_MODULES, "fake", ("fake_backend_for_test",))
    try:
        assert resolve_backend("fake", "cpu") == "fake"
        assert get_op("paged_attention", "fake")() == "fake"
        assert get_op("causal_conv1d", "fake") is causal_conv1d
    finally:
        registry._loaded.pop("fake", None)
        registry._resolved.pop(("fake", "cpu"), None)
        registry._impls.pop(("paged_attention", "fake"), None)


@pytest.mark.parametrize("preset", ["tiny", "small", "qwen3-coder-next"])
def test_gdn_column_map_keeps_its_run_promise(preset):
    """GatedDeltaNet.qkv_run: every aligned run of that many conv channels reads consecutive in_proj_qkvz columns
    starting at a multiple of the run (what the Triton conv's block-wise read of x_cols relies on)."""
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.weights.presets import preset_config

    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config(preset)), 0, dtype=torch.float32, device="meta")
    cols, run = gdn.qkv_columns(torch.device("cpu")).long(), gdn.qkv_run
    assert run >= 16 and run & (run - 1) == 0 and cols.numel() % run == 0
    blocks = cols.view(-1, run)
    assert torch.equal(blocks - blocks[:, :1], torch.arange(run).expand_as(blocks))
    assert (blocks[:, 0] % run == 0).all()
    assert sorted(cols.tolist()) == sorted(set(cols.tolist()))          # each column feeds one channel
