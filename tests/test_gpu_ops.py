"""Fast ops (Triton / fla-core) against their torch references on random inputs of odd sizes.

The CUDA tests skip without a GPU (run them on the device machine: `pytest tests/test_gpu_ops.py`); the
quantize/dequantize round trips and the reference MoE run everywhere. Errors are ||out - ref|| / ||ref|| against a
float32 reference; bf16 operands land near 1e-3..1e-2.
"""

from __future__ import annotations

import os

import pytest
import torch
from paged_case import paged_case

from qnext.ops.quant import (INT4_TILE_ROWS, Fp8BlockWeight, Int4GroupWeight, dequantize, moe_forward_ref, pack_int4,
                             quantize, quantize_fp8_block, quantize_int4_group, select_experts, tile_int4, unpack_int4,
                             untile_int4)

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA (run on the GPU machine)")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (unwritten or NaN)"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def poison_allocator(mib: int = 256) -> None:
    """Fill the caching allocator's free memory with NaN so that an unwritten output element shows up."""
    x = torch.full((mib << 18,), float("nan"), device="cuda")
    del x


# ---- CPU: formats and the reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 128])
def test_int4_pack_roundtrip(group):
    codes = torch.randint(0, 16, (3, 5, 256))
    packed = pack_int4(codes, group)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 128)
    assert torch.equal(unpack_int4(packed, group).long(), codes)
    half = group // 2                       # byte j of group 1: k = group + j (low), group + half + j (high)
    assert torch.equal(packed[0, 0, half + 3] & 0xF, codes[0, 0, group + 3].to(torch.uint8))
    assert torch.equal(packed[0, 0, half + 3] >> 4, codes[0, 0, group + half + 3].to(torch.uint8))


@pytest.mark.parametrize("group", [32, 128])
def test_int4_quantize_dequantize(group):
    w = torch.randn(3, 40, 256)
    q = quantize_int4_group(w, group)
    assert isinstance(q, Int4GroupWeight) and q.shape == w.shape and q.scale.shape == (3, 40, 256 // group)
    assert rel(dequantize(q), w) < 0.12                                            # 4-bit: ~9% rms error
    again = quantize_int4_group(dequantize(q), group)                             # exactly representable
    assert torch.equal(again.qweight, q.qweight) and torch.equal(dequantize(again), dequantize(q))


@pytest.mark.parametrize("group,tile_rows", [(128, 64), (32, 16), (128, INT4_TILE_ROWS)])
def test_int4_tiles(group, tile_rows):
    """Tiled storage: every byte and scale where quant's docstring puts it, the same dequantized weight, and back."""
    q = quantize_int4_group(torch.randn(3, 128, 256), group)
    t = tile_int4(q, tile_rows)
    assert t.tile_rows == tile_rows and t.qweight.shape == q.qweight.shape and t.scale.shape == q.scale.shape
    groups, gb = 256 // group, group // 2
    n, b = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    off = ((n // tile_rows) * groups + b // gb) * (tile_rows * gb) + (n % tile_rows) * gb + b % gb
    assert torch.equal(t.qweight.reshape(3, -1)[:, off], q.qweight)
    n, g = torch.meshgrid(torch.arange(128), torch.arange(groups), indexing="ij")
    assert torch.equal(t.scale.reshape(3, -1)[:, ((n // tile_rows) * groups + g) * tile_rows + n % tile_rows],
                       q.scale)
    assert torch.equal(dequantize(t), dequantize(q))
    back = untile_int4(t)
    assert back.tile_rows == 0 and torch.equal(back.qweight, q.qweight) and torch.equal(back.scale, q.scale)
    with pytest.raises(ValueError, match="divisible"):
        tile_int4(q, 48)


def test_fp8_quantize_dequantize_odd_shapes():
    w = torch.randn(2, 300, 260) * 3
    q = quantize_fp8_block(w)
    assert isinstance(q, Fp8BlockWeight) and q.scale_inv.shape == (2, 3, 3) and q.w.dtype == torch.float8_e4m3fn
    assert rel(dequantize(q), w) < 0.04
    again = quantize_fp8_block(dequantize(q))
    assert torch.equal(dequantize(again), dequantize(q))


def test_reference_moe_matches_model_experts():
    from qnext.model.layers.moe import Experts
    torch.manual_seed(0)
    m, h, inter, e, k = 9, 48, 32, 7, 3
    experts = Experts(e, h, inter, dtype=torch.float32)
    experts.gate_up_proj.data.normal_(0, 0.2)
    experts.down_proj.data.normal_(0, 0.2)
    x = torch.randn(m, h)
    weights, ids = select_experts(torch.randn(m, e), k)
    ref = experts(x, ids.long(), weights)
    out = moe_forward_ref(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids)
    assert rel(out, ref) < 1e-5


def test_reference_moe_quantized_is_dequantized_bf16():
    torch.manual_seed(1)
    w13, w2 = torch.randn(5, 64, 128) * 0.1, torch.randn(5, 128, 32) * 0.1
    x = torch.randn(4, 128)
    weights, ids = select_experts(torch.randn(4, 5), 2)
    for method in ("fp8", "int4"):
        a, b = quantize(w13, method, 32), quantize(w2, method, 32)
        assert rel(moe_forward_ref(x, a, b, weights, ids), moe_forward_ref(x, dequantize(a), dequantize(b),
                                                                           weights, ids)) < 1e-6


# ---- CUDA: MoE -----------------------------------------------------------------------------------------------------

def _moe_weights(kind: str, e: int, h: int, inter: int, device="cuda"):
    w13 = (torch.randn(e, 2 * inter, h, device=device) / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, inter, device=device) / inter ** 0.5).bfloat16()
    if kind == "bf16":
        return w13, w2
    if kind == "fp8":
        return quantize_fp8_block(w13), quantize_fp8_block(w2)
    group, *tiles = kind.split("_")[1:]                    # int4_<group>[_tiles]: the GPU engine's storage
    w13, w2 = quantize_int4_group(w13, int(group)), quantize_int4_group(w2, int(group))
    if tiles:
        return tile_int4(w13, INT4_TILE_ROWS), tile_int4(w2, INT4_TILE_ROWS)
    return w13, w2


@cuda_only
@pytest.mark.parametrize("kind", ["bf16", "fp8", "int4_128", "int4_32", "int4_128_tiles", "int4_32_tiles"])
@pytest.mark.parametrize("path", ["gemv", "grouped", "sorted"])
@pytest.mark.parametrize("m,e,k", [(1, 16, 4), (7, 13, 3), (133, 20, 5)])
def test_fused_moe(kind, path, m, e, k):
    from qnext.ops.triton_moe import fused_moe
    torch.manual_seed(m * 31 + e)
    h, inter = 384, 256
    w13, w2 = _moe_weights(kind, e, h, inter)
    x = torch.randn(m, h, device="cuda").bfloat16()
    weights, ids = select_experts(torch.randn(m, e, device="cuda"), k)
    ref = moe_forward_ref(x, w13, w2, weights, ids, h_dtype=torch.bfloat16)
    poison_allocator()
    out = fused_moe(x, w13, w2, weights, ids, path=path)
    assert out.shape == (m, h) and out.dtype == torch.bfloat16
    assert rel(out, ref) < 1.5e-2


@cuda_only
@pytest.mark.parametrize("kind", ["int4_32", "int4_128", "int4_128_tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_sorted_dq_pairs(kind, dtype):
    """The prefill MoE's swapped int4 tiles dequantizing two bytes at a time (config dq_pairs) against the
    reference, and equal to the four-byte dequantization (the same values reach the same dots)."""
    from qnext.ops.triton_moe import fused_moe
    torch.manual_seed(5)
    w13, w2 = _moe_weights(kind, 12, 384, 256)
    x = torch.randn(300, 384, device="cuda").to(dtype)
    weights, ids = select_experts(torch.randn(300, 12, device="cuda"), 4)
    ref = moe_forward_ref(x, w13, w2, weights, ids, h_dtype=dtype)
    out = fused_moe(x, w13, w2, weights, ids, path="sorted", config={"dq_pairs": True})
    assert rel(out, ref) < 1.5e-2
    assert torch.equal(out, fused_moe(x, w13, w2, weights, ids, path="sorted", config={"dq_pairs": False}))


@cuda_only
@pytest.mark.parametrize("kind", ["int4_32", "int4_128", "int4_128_tiles", "fp8"])
@pytest.mark.parametrize("m", [3, 12])                  # 12 pairs at k = 4: split mode; 48: the looped one
@pytest.mark.parametrize("config", [dict(mma=False), dict(mma=False, split=False), dict(mma=True),
                                    dict(mma=True, mbm1=4, mw1=4), dict(mma=True, mbm2=16, mw2=4, mks2=16),
                                    dict(mma=True, mbm1=2, mbm2=2, mks2=None, mst=3), dict(mma=True, mks1=32),
                                    dict(mma=True, mks2=128)])
def test_fused_moe_gemv_variants(kind, m, config):
    """The fp8 / int4 GEMV kernels both ways: on CUDA cores (mma=False) in both modes, and on tensor cores
    (triton_moe_gemv_mma) with several tilings."""
    from qnext.ops.triton_moe import fused_moe
    torch.manual_seed(len(kind) + m)
    w13, w2 = _moe_weights(kind, 9, 384, 256)
    x = torch.randn(m, 384, device="cuda").bfloat16()
    weights, ids = select_experts(torch.randn(m, 9, device="cuda"), 4)
    ref = moe_forward_ref(x, w13, w2, weights, ids, h_dtype=torch.bfloat16)
    out = fused_moe(x, w13, w2, weights, ids, path="gemv", config=config)
    assert rel(out, ref) < 1.5e-2


@cuda_only
@pytest.mark.parametrize("pairs", [False, True])
def test_int4_dequant_asm_matches_arith(pairs):
    """The inline-PTX int4 dequantization (int4_dq's default; four bytes at a time, or two with PAIRS) gives
    exactly the Triton-language version's values, for every byte and both 16-bit types."""
    import triton
    import triton.language as tl
    from qnext.ops import triton_moe_weights as tw

    @triton.jit
    def dq(p_ptr, lo_ptr, hi_ptr, DT: tl.constexpr, PAIRS: tl.constexpr):
        i = tl.arange(0, 256)
        lo, hi = tw.int4_dq(tl.load(p_ptr + i), DT, PAIRS)
        tl.store(lo_ptr + i, lo)
        tl.store(hi_ptr + i, hi)

    p = torch.arange(256, dtype=torch.uint8, device="cuda")
    for dt in (torch.bfloat16, torch.float16):
        lo, hi = torch.empty(256, dtype=dt, device="cuda"), torch.empty(256, dtype=dt, device="cuda")
        dq[(1,)](p, lo, hi, DT=tl.bfloat16 if dt == torch.bfloat16 else tl.float16, PAIRS=pairs)
        want_lo = (p.long() & 0xF) - 8
        want_hi = (p.long() >> 4) - 8
        assert torch.equal(lo.float(), want_lo.float()) and torch.equal(hi.float(), want_hi.float()), dt
    assert bool(tw.INT4_DQ_ASM) == (os.environ.get("QNEXT_INT4_DQ", "asm") == "asm")


@cuda_only
def test_moe_align_covers_every_pair_once():
    from qnext.ops.triton_moe_sorted import moe_align
    ids = torch.randint(0, 11, (37, 4), device="cuda")
    pairs, block_e = moe_align(ids, 11, 16)
    p = ids.numel()
    valid = pairs[pairs < p].long()
    assert torch.equal(valid.sort().values, torch.arange(p, device="cuda"))
    blocks = pairs.view(-1, 16)
    for b in range(blocks.shape[0]):                                   # each block holds pairs of its expert only
        row = blocks[b][blocks[b] < p].long()
        if row.numel():
            assert (ids.reshape(-1)[row] == block_e[b]).all()


@cuda_only
@pytest.mark.parametrize("p_tokens,e,k", [(1, 512, 10), (32, 512, 10), (300, 64, 8), (200, 8, 4)])
def test_group_pairs_lists_every_pair_under_its_expert(p_tokens, e, k):
    from qnext.ops.triton_moe_grouped import group_pairs
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(p_tokens)]).int()
    slot_e, slot_cnt, slot_pairs, used = group_pairs(ids, e)
    flat, n = ids.reshape(-1), int(used)
    got: dict[int, list[int]] = {}
    for s in range(n):                          # each slot: 1..16 pairs of one expert, the experts in order
        assert 1 <= int(slot_cnt[s]) <= slot_pairs.shape[1]
        got.setdefault(int(slot_e[s]), []).extend(slot_pairs[s, : int(slot_cnt[s])].tolist())
    experts = flat.unique().tolist()
    assert list(got) == experts
    for ex in experts:
        assert got[ex] == (flat == ex).nonzero().flatten().tolist()


# ---- CUDA: gated delta rule --------------------------------------------------------------------------------------

def _gdn_inputs(t, hk=4, hv=8, dk=128, dv=128, n=None, batch=1):
    q = torch.randn(batch, t, hk, dk, device="cuda").bfloat16()
    k = torch.randn(batch, t, hk, dk, device="cuda").bfloat16()
    v = torch.randn(batch, t, hv, dv, device="cuda").bfloat16()
    g = -torch.rand(batch, t, hv, device="cuda") * 0.5 - 0.01
    beta = torch.rand(batch, t, hv, device="cuda")
    h0 = torch.randn(n or batch, hv, dk, dv, device="cuda") * 0.5
    return q, k, v, g, beta, h0


@cuda_only
def test_fla_chunk_matches_reference_varlen():
    from qnext.ops import delta_rule
    from qnext.ops.fla_gdn import chunk_gated_delta_rule
    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 65, 200, 203], device="cuda", dtype=torch.int32)
    q, k, v, g, beta, h0 = _gdn_inputs(203, n=4)
    ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                         use_qk_l2norm_in_kernel=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    assert rel(o, ref_o) < 2e-2 and rel(s, ref_s) < 2e-2


@cuda_only
def test_fla_chunk_bounds_converted_once_per_batch():
    """All GDN layers of a step share one int64 copy of its cu_seqlens (fla's identity-keyed cache then computes
    the chunk indices, a host sync, once per step); the next batch's bounds never come from the old copy."""
    from qnext.ops import delta_rule
    from qnext.ops.fla_gdn import _int64_bounds, chunk_gated_delta_rule
    torch.manual_seed(3)
    for bounds in ([0, 1, 65, 200, 203], [0, 130, 131, 140, 203]):
        cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
        assert _int64_bounds(cu, cu.device) is _int64_bounds(cu, cu.device)
        q, k, v, g, beta, h0 = _gdn_inputs(203, n=4)
        ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                             use_qk_l2norm_in_kernel=True)
        for _ in range(2):  # the second call hits fla's cached chunk indices
            o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                          use_qk_l2norm_in_kernel=True)
            assert rel(o, ref_o) < 2e-2 and rel(s, ref_s) < 2e-2


@cuda_only
@pytest.mark.parametrize("impl", ["ours", "fla"])
def test_recurrent_matches_reference(impl):
    from qnext.ops import delta_rule, fla_gdn
    fn = fla_gdn.recurrent_gated_delta_rule if impl == "ours" else fla_gdn.fla_recurrent_gated_delta_rule
    torch.manual_seed(1)
    q, k, v, g, beta, h0 = _gdn_inputs(1, hk=2, hv=6, dk=128, dv=96, batch=5)                 # decode
    ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                         use_qk_l2norm_in_kernel=True)
    o, s = fn(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    assert rel(o, ref_o) < 1e-2 and rel(s, ref_s) < 1e-4
    cu = torch.tensor([0, 3, 4, 11], device="cuda", dtype=torch.int32)                          # varlen
    q, k, v, g, beta, h0 = _gdn_inputs(11, hk=2, hv=6, dk=128, dv=96, n=3)
    ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                         use_qk_l2norm_in_kernel=True)
    o, s = fn(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    assert rel(o, ref_o) < 1e-2 and rel(s, ref_s) < 1e-4


def _slot_case(n, num_slots=11, hk=4, hv=8, d=128):
    slots = torch.randperm(num_slots, device="cuda")[:n]
    init = torch.rand(n, device="cuda") < 0.6
    cache = torch.randn(num_slots, hv, d, d, device="cuda")
    a_log = torch.empty(hv, device="cuda").uniform_(-4, -0.7)
    dt_bias = torch.randn(hv, device="cuda") * 0.5
    return slots, init, cache, a_log, dt_bias


@cuda_only
def test_gdn_slot_decode_and_prefill_in_place():
    from qnext.ops import delta_rule
    from qnext.ops.fla_gdn import gdn_decode_, gdn_gates, gdn_prefill_
    torch.manual_seed(2)
    n, hk, hv, d = 6, 4, 8, 128
    slots, init, cache, a_log, dt_bias = _slot_case(n)
    q, k = (torch.randn(n, hk, d, device="cuda").bfloat16() for _ in range(2))
    v = torch.randn(n, hv, d, device="cuda").bfloat16()
    a, b = torch.randn(n, hv, device="cuda"), torch.randn(n, hv, device="cuda")
    g, beta = gdn_gates(a, b, a_log, dt_bias)
    h0 = torch.where(init.view(-1, 1, 1, 1), cache[slots], 0.0)
    ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None],
                                                         beta[:, None], initial_state=h0,
                                                         use_qk_l2norm_in_kernel=True)
    new = cache.clone()
    o = gdn_decode_(q, k, v, a, b, a_log, dt_bias, new, slots, init)
    others = torch.ones(cache.shape[0], dtype=torch.bool, device="cuda")
    others[slots] = False
    assert rel(o, ref_o[:, 0]) < 1e-2 and rel(new[slots], ref_s) < 1e-4
    assert torch.equal(new[others], cache[others])

    cu = torch.tensor([0, 70, 71, 200, 203, 260, 300], device="cuda", dtype=torch.int32)
    t = 300
    q, k = (torch.randn(t, hk, d, device="cuda").bfloat16() for _ in range(2))
    v = torch.randn(t, hv, d, device="cuda").bfloat16()
    a, b = torch.randn(t, hv, device="cuda"), torch.randn(t, hv, device="cuda")
    g, beta = gdn_gates(a, b, a_log, dt_bias)
    ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                                         initial_state=h0, cu_seqlens=cu,
                                                         use_qk_l2norm_in_kernel=True)
    new = cache.clone()
    o = gdn_prefill_(q, k, v, a, b, a_log, dt_bias, new, slots, init, cu)
    assert rel(o, ref_o[0]) < 2e-2 and rel(new[slots], ref_s) < 2e-2
    assert torch.equal(new[others], cache[others])


# ---- CUDA: causal conv -------------------------------------------------------------------------------------------

@cuda_only
def test_causal_conv_matches_reference():
    from qnext.ops import causal_conv
    from qnext.ops.triton_conv1d import (causal_conv1d, causal_conv1d_prefill_, causal_conv1d_update,
                                         causal_conv1d_update_)
    torch.manual_seed(3)
    c, kw = 1000, 4
    w = torch.randn(c, kw, device="cuda").bfloat16()
    cu = torch.tensor([0, 1, 3, 90, 93, 300], device="cuda", dtype=torch.int32)
    x = torch.randn(300, c + 64, device="cuda").bfloat16()[:, 32:32 + c]                   # strided view
    h0 = torch.randn(5, c, kw - 1, device="cuda").bfloat16()
    ref_y, ref_s = causal_conv.causal_conv1d(x, w, h0, cu)
    y, s = causal_conv1d(x, w, h0, cu)
    assert rel(y, ref_y) < 1e-2 and rel(s, ref_s) == 0.0
    cache = torch.randn(9, c, kw - 1, device="cuda").bfloat16()
    slots = torch.tensor([4, 0, 8, 2, 6], device="cuda")
    init = torch.tensor([True, False, True, True, False], device="cuda")
    start = torch.where(init.view(-1, 1, 1), cache[slots], 0.0)
    ref_y, ref_s = causal_conv.causal_conv1d(x, w, start, cu)
    new = cache.clone()
    y = causal_conv1d_prefill_(x, w, new, slots, init, cu)
    assert rel(y, ref_y) < 1e-2 and rel(new[slots], ref_s) == 0.0
    assert torch.equal(new[[1, 3, 5, 7]], cache[[1, 3, 5, 7]])

    xs = torch.randn(5, c, device="cuda").bfloat16()
    ref_y, ref_s = causal_conv.causal_conv1d_update(xs, h0, w)
    y, s = causal_conv1d_update(xs, h0, w)
    assert rel(y, ref_y) < 1e-2 and rel(s, ref_s) == 0.0
    new = cache.clone()
    y = causal_conv1d_update_(xs, w, new, slots)
    ref_y, ref_s = causal_conv.causal_conv1d_update(xs, cache[slots], w)
    assert rel(y, ref_y) < 1e-2 and rel(new[slots], ref_s) == 0.0



@cuda_only
def test_slot_conv_ops_with_column_map_match_reference():
    """The GDN layer's call: q, k, v channels read through a column map out of in_proj_qkvz's interleaved output,
    states in place at slots, one fresh sequence (no initial state) in the decode batch too."""
    from qnext.ops import causal_conv, triton_conv1d
    torch.manual_seed(4)
    c, kw, width = 1000, 4, 1536
    w = torch.randn(c, kw, device="cuda").bfloat16()
    cols = torch.randperm(width, device="cuda")[:c].to(torch.int32)
    cache = torch.randn(9, c, kw - 1, device="cuda").bfloat16()
    slots = torch.tensor([4, 0, 8, 2, 6], device="cuda")
    init = torch.tensor([True, False, True, True, False], device="cuda")
    cu = torch.tensor([0, 1, 3, 90, 93, 300], device="cuda", dtype=torch.int32)
    x = torch.randn(300, width, device="cuda").bfloat16()
    mine, ref = cache.clone(), cache.clone()
    y = triton_conv1d.causal_conv1d_prefill_(x, w, mine, slots, init, cu, x_cols=cols)
    y_ref = causal_conv.causal_conv1d_prefill_(x.float(), w.float(), ref, slots, init, cu, x_cols=cols)
    assert rel(y, y_ref) < 1e-2 and torch.equal(mine, ref)
    xs = torch.randn(5, width, device="cuda").bfloat16()
    y = triton_conv1d.causal_conv1d_update_(xs, w, mine, slots, init, x_cols=cols)
    y_ref = causal_conv.causal_conv1d_update_(xs.float(), w.float(), ref, slots, init, x_cols=cols)
    assert rel(y, y_ref) < 1e-2 and torch.equal(mine, ref)


@cuda_only
@pytest.mark.parametrize("preset", ["small", "qwen3-coder-next"])
def test_conv_prefill_reads_the_gdn_column_map_by_runs(preset):
    """x_cols_run: the GDN layer's own map (aligned runs of consecutive columns) read block-wise."""
    from qnext.config import ModelConfig
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.ops import causal_conv, triton_conv1d
    from qnext.weights.presets import preset_config
    torch.manual_seed(5)
    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config(preset)), 0, dtype=torch.bfloat16, device="meta")
    cols = gdn.qkv_columns(torch.device("cuda"))
    c, kw = cols.numel(), 4
    w = torch.randn(c, kw, device="cuda").bfloat16()
    cache = torch.randn(9, c, kw - 1, device="cuda").bfloat16()
    slots = torch.tensor([4, 0, 8], device="cuda")
    init = torch.tensor([True, False, True], device="cuda")
    cu = torch.tensor([0, 2, 70, 333], device="cuda", dtype=torch.int32)
    x = torch.randn(333, gdn.in_proj_qkvz.out_features, device="cuda").bfloat16()
    mine, ref = cache.clone(), cache.clone()
    poison_allocator()
    y = triton_conv1d.causal_conv1d_prefill_(x, w, mine, slots, init, cu, x_cols=cols, x_cols_run=gdn.qkv_run)
    y_ref = causal_conv.causal_conv1d_prefill_(x.float(), w.float(), ref, slots, init, cu, x_cols=cols)
    assert gdn.qkv_run >= 16 and rel(y, y_ref) < 1e-2 and torch.equal(mine, ref)
    kd = gdn.hk * gdn.dk                        # q, k, v in contiguous planes, as the GDN layer asks: the same values
    parts = triton_conv1d.causal_conv1d_prefill_(x, w, cache.clone(), slots, init, cu, x_cols=cols,
                                                 x_cols_run=gdn.qkv_run, split=(kd, kd))
    assert all(p.is_contiguous() for p in parts) and torch.equal(torch.cat(parts, dim=1), y)


# ---- CUDA: norms and feed-forward glue ---------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("rows,d", [(1, 2048), (37, 2048), (5, 96), (4099, 2048)])   # 4099: several rows a program
def test_rmsnorm_kernels_match_reference(rows, d):
    from qnext.ops import norm, triton_norm
    torch.manual_seed(5)
    x, r = (torch.randn(rows, d, device="cuda").bfloat16() for _ in range(2))
    w = (torch.randn(d, device="cuda") * 0.1).bfloat16()
    assert rel(triton_norm.rmsnorm(x, w, 1e-6), norm.rmsnorm(x.float(), w.float(), 1e-6)) < 5e-3
    (y, s), (y_ref, s_ref) = triton_norm.rmsnorm(x, w, 1e-6, r), norm.rmsnorm(x, w, 1e-6, r)
    assert torch.equal(s, s_ref) and rel(y, y_ref) < 5e-3            # the residual add rounds like torch's
    heads = torch.randn(rows, 16, 512, device="cuda").bfloat16()      # [q | gate] per head: q is strided
    q, wq = heads[..., :256], (torch.randn(256, device="cuda") * 0.1).bfloat16()
    ang = torch.randn(rows, 32, device="cuda")
    assert rel(triton_norm.rmsnorm(q, wq, 1e-6), norm.rmsnorm(q.float(), wq.float(), 1e-6)) < 5e-3
    assert rel(triton_norm.rmsnorm_rope(q, wq, 1e-6, ang.cos(), ang.sin()),
               norm.rmsnorm_rope(q, wq, 1e-6, ang.cos(), ang.sin())) < 5e-3
    qkvz = torch.randn(rows, 16, 768, device="cuda").bfloat16()      # z of 2 value heads per key head
    z = qkvz[..., 512:].unflatten(-1, (2, 128))
    o = torch.randn(rows, 16, 2, 128, device="cuda").bfloat16()
    wg = torch.rand(128, device="cuda").bfloat16()
    assert rel(triton_norm.gated_rmsnorm(o, z, wg, 1e-6), norm.gated_rmsnorm(o.float(), z.float(), wg.float(),
                                                                               1e-6)) < 5e-3


@cuda_only
@pytest.mark.parametrize("t", [1, 8, 333])
def test_ffn_glue_kernels_match_reference(t):
    from qnext.ops import moe, triton_ffn
    torch.manual_seed(6)
    logits = torch.randn(t, 512, device="cuda") * 3                  # float32: no ties, so the ids must agree
    ids, weights = triton_ffn.moe_route(logits, 10, True)
    ids_ref, weights_ref = moe.moe_route(logits, 10, True)
    assert torch.equal(ids, ids_ref) and rel(weights, weights_ref) < 1e-5
    ids, weights = triton_ffn.moe_route(logits[:, :60], 4, False)
    ids_ref, weights_ref = moe.moe_route(logits[:, :60], 4, False)
    assert torch.equal(ids, ids_ref) and rel(weights, weights_ref) < 1e-5
    logits = logits.bfloat16()                                       # bf16 ties may order differently
    (ids, weights), (_, weights_ref) = triton_ffn.moe_route(logits, 10, True), moe.moe_route(logits, 10, True)
    assert rel(weights, weights_ref) < 1e-5 and (ids.sort(-1)[0].diff(dim=-1) > 0).all()
    g, u, y = (torch.randn(t, 2048, device="cuda").bfloat16() for _ in range(3))
    gate = torch.randn(t, 1, device="cuda").bfloat16()
    assert rel(triton_ffn.silu_mul(g, u), moe.silu_mul(g.float(), u.float())) < 5e-3
    assert rel(triton_ffn.sigmoid_gate_add(y, gate, u), moe.sigmoid_gate_add(y.float(), gate.float(), u.float())) < 5e-3
    per_expert = torch.randn(t, 10, 2048, device="cuda").bfloat16()              # unsummed routed outputs
    assert rel(triton_ffn.sigmoid_gate_add(per_expert, gate, u),
               moe.sigmoid_gate_add(per_expert.float(), gate.float(), u.float())) < 5e-3
    gu = torch.randn(t, 1024, device="cuda").bfloat16()                          # stacked [gate | up]
    g2, u2 = gu[:, :512], gu[:, 512:]
    assert rel(triton_ffn.silu_mul(g2, u2), moe.silu_mul(g2.float(), u2.float())) < 5e-3
    rg = torch.randn(t, 513, device="cuda").bfloat16()[:, 512:]                   # [router | shared gate]
    assert rel(triton_ffn.sigmoid_gate_add(y, rg, u), moe.sigmoid_gate_add(y.float(), rg.float(), u.float())) < 5e-3
    from qnext.ops import triton_norm
    from qnext.ops.norm import MoeCombine
    res, w = torch.randn(t, 2048, device="cuda").bfloat16(), torch.randn(2048, device="cuda").bfloat16() * 0.1
    for routed in (per_expert, y):                     # the norm forms the MoE output: the two kernels' bits
        fused = triton_norm.rmsnorm(MoeCombine(routed, rg, u), w, 1e-6, res)
        apart = triton_norm.rmsnorm(triton_ffn.sigmoid_gate_add(routed, rg, u), w, 1e-6, res)
        assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])


@cuda_only
@pytest.mark.parametrize("m", [1, 300])
def test_fused_moe_unreduced_sums_to_reduced(m):
    from qnext.ops.triton_moe import fused_moe
    torch.manual_seed(7)
    e, h, inter, k = 16, 256, 128, 4
    w13 = quantize_int4_group(torch.randn(e, 2 * inter, h, device="cuda") / 16, 128)
    w2 = quantize_int4_group(torch.randn(e, h, inter, device="cuda") / 16, 128)
    x = torch.randn(m, h, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(m)])
    tw = torch.rand(m, k, device="cuda")
    whole = fused_moe(x, w13, w2, tw, ids)
    parts = fused_moe(x, w13, w2, tw, ids, reduce=False)
    assert parts.dim() in (2, 3)
    assert rel(parts.sum(1) if parts.dim() == 3 else parts, whole) < 1e-2


# ---- CUDA: paged attention ---------------------------------------------------------------------------------------

def _paged_case(ctx, qlens, block_size, gated=False):
    return paged_case(ctx, qlens, block_size, hq=16, hkv=2, d=256, num_blocks=200, device="cuda",
                      dtype=torch.bfloat16, gated=gated)


def _paged_ref(case):
    from qnext.ops import paged_attention
    c = dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
    return paged_attention.paged_attention(**c)


@cuda_only
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_decode_matches_reference(block_size, gated):
    from qnext.ops.triton_paged_attention import paged_attention, paged_decode_attention
    torch.manual_seed(4)
    ctx = [0, 16, 299, 1000, 77]
    case = _paged_case(ctx, [1] * len(ctx), block_size, gated)
    ref = _paged_ref(case)
    poison_allocator()
    mine = dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
    out = paged_attention(**mine)
    assert rel(out, ref) < 1e-2
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    kc.view(-1, *kc.shape[2:])[case["slot_mapping"]] = case["k"]
    vc.view(-1, *vc.shape[2:])[case["slot_mapping"]] = case["v"]
    assert torch.equal(mine["k_cache"], kc) and torch.equal(mine["v_cache"], vc)     # write_kv, bit for bit
    for splits in (1, 3, 16):
        out = paged_decode_attention(case["q"], kc, vc, case["block_tables"], case["seq_lens"], case["scale"],
                                     max_seq_len=1001, num_splits=splits, gate=case.get("gate"))
        assert rel(out, ref) < 1e-2


@cuda_only
@pytest.mark.parametrize("ctx,qlens", [([0, 16, 299, 1000, 77], [1] * 5), ([300, 2, 700, 0], [1, 200, 1, 40])])
def test_paged_attention_over_an_fp8_cache(ctx, qlens):
    """kv_cache_dtype fp8: the one-launch write clamps and rounds exactly as torch's saturating cast (values up to
    1000 here), and every attention path (decode with splits, SDPA over gathered pages, the paged prefill kernel)
    matches the torch reference reading the same e4m3 pages."""
    from qnext.ops.paged_attention import to_cache_dtype
    from qnext.ops.triton_paged_attention import paged_attention
    torch.manual_seed(7)
    case = _paged_case(ctx, qlens, 16)
    case["k"][0, 0, :3] = torch.tensor([1000.0, -1000.0, 447.0])
    case["k_cache"], case["v_cache"] = (to_cache_dtype(case[c], torch.float8_e4m3fn) for c in ("k_cache", "v_cache"))
    ref = _paged_ref(case)
    poison_allocator()
    mine = dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
    out = paged_attention(**mine)
    assert rel(out, ref) < 1e-2
    for cache, new in ((mine["k_cache"], case["k"]), (mine["v_cache"], case["v"])):
        rows = cache.view(torch.uint8).view(-1, *cache.shape[2:])[case["slot_mapping"]]
        assert torch.equal(rows, to_cache_dtype(new, torch.float8_e4m3fn).view(torch.uint8))   # bit for bit
    assert mine["k_cache"].view(-1, 2, 256)[case["slot_mapping"][0], 0, :3].float().tolist() == [448, -448, 448]


@cuda_only
def test_gdn_decode_with_bf16_state_storage():
    """ssm_state_dtype bfloat16: the decode kernel computes in float32 from the widened state and stores it
    rounded; the torch reference does the same (state and output within bf16 rounding of each other)."""
    from qnext.ops import delta_rule
    from qnext.ops.fla_gdn import gdn_decode_
    torch.manual_seed(3)
    n, hk, hv, d = 6, 4, 8, 128
    slots, init, cache, a_log, dt_bias = _slot_case(n)
    cache = cache.bfloat16()
    q, k = (torch.randn(n, hk, d, device="cuda").bfloat16() for _ in range(2))
    v = torch.randn(n, hv, d, device="cuda").bfloat16()
    a, b = torch.randn(n, hv, device="cuda"), torch.randn(n, hv, device="cuda")
    ref_cache, mine = cache.clone(), cache.clone()
    ref_o = delta_rule.gdn_decode_(q, k, v, a, b, a_log, dt_bias, ref_cache, slots, init)
    o = gdn_decode_(q, k, v, a, b, a_log, dt_bias, mine, slots, init)
    assert mine.dtype == torch.bfloat16 and rel(o, ref_o) < 1e-2 and rel(mine.float(), ref_cache.float()) < 1e-2


@cuda_only
def test_paged_fresh_prefill_uses_sdpa_and_matches():
    from qnext.ops.triton_paged_attention import paged_attention
    torch.manual_seed(6)
    case = _paged_case([0, 0, 0], [300, 1, 77], 16)
    ref = _paged_ref(case)
    out = paged_attention(**dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone()))
    assert rel(out, ref) < 1e-2


@cuda_only
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("ctx,qlens", [([0, 37, 5, 130], [50, 9, 1, 64]), ([300, 2, 700], [1, 200, 1])])
def test_paged_prefill_matches_reference(gated, ctx, qlens):
    """Every path of a mixed step: fresh prompts (SDPA), short chunks (paged kernel), long chunks over cached
    context (SDPA on gathered K/V, flash with a bottom-right mask), decodes."""
    from qnext.ops.triton_paged_attention import paged_attention
    torch.manual_seed(5)
    case = _paged_case(ctx, qlens, 16, gated)
    ref = _paged_ref(case)
    poison_allocator()
    out = paged_attention(**dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone()))
    assert rel(out, ref) < 1e-2


# ---- CUDA: fp8 linear --------------------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("path", ["gemv", "w8a8", "w8a16", "dequant", "auto"])
@pytest.mark.parametrize("m", [1, 3, 5, 33, 67, 300])
def test_fp8_linear(path, m):
    from qnext.ops.triton_linear_fp8 import fp8_linear
    torch.manual_seed(m)
    w = quantize_fp8_block(torch.randn(384, 640, device="cuda") / 640 ** 0.5)
    x = torch.randn(m, 640, device="cuda").bfloat16()
    xr = x.float()
    if path == "w8a8":                  # w8a8 also rounds activations to e4m3 per (row, 128 columns)
        blocks = xr.view(m, -1, 128)
        scale = (blocks.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
        xr = ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).view(m, -1)
    ref = xr @ dequantize(w).t()
    poison_allocator()
    out = fp8_linear(x, w, path=path)
    assert out.shape == (m, 384) and rel(out, ref) < 1e-2


@cuda_only
@pytest.mark.parametrize("m", [5, 8, 32, 64])
@pytest.mark.parametrize("n,k", [(384, 640), (2048, 512), (1024, 2048)])
def test_fp8_w8a16_swapped_operands(m, n, k):
    """small_m_tiles(swap=True): the weights as the MMA's first operand, the output stored transposed back; the
    same reference as the unswapped tiles, with and without split-K."""
    from qnext.ops.triton_linear_fp8 import fp8_linear, small_m_tiles
    torch.manual_seed(m + n)
    w = quantize_fp8_block(torch.randn(n, k, device="cuda") / k ** 0.5)
    x = torch.randn(m, k, device="cuda").bfloat16()
    ref = x.float() @ dequantize(w).t()
    poison_allocator()
    for tiles in (small_m_tiles(m, n, k, swap=True), dict(small_m_tiles(m, n, k, swap=True), split=1)):
        assert rel(fp8_linear(x, w, path="w8a16", tiles=tiles), ref) < 1e-2, tiles


@cuda_only
@pytest.mark.parametrize("split", [2, 4, 8])
def test_fp8_w8a16_split_k_is_deterministic(split):
    """Split-K w8a16 (decode batches): matches the reference, the same bits on every call (the last program of a
    tile sums the partials in split order), and the tickets are back at zero after each call (else the next call's
    tiles would never be written: poisoned outputs would show)."""
    from qnext.ops.triton_linear_fp8 import fp8_linear, small_m_tiles
    torch.manual_seed(split)
    w = quantize_fp8_block(torch.randn(384, 1024, device="cuda") / 32)
    x = torch.randn(20, 1024, device="cuda").bfloat16()
    tiles = {**small_m_tiles(20, 384, 1024), "split": split}
    ref = x.float() @ dequantize(w).t()
    outs = []
    for _ in range(3):
        poison_allocator()
        outs.append(fp8_linear(x, w, path="w8a16", tiles=tiles))
    assert rel(outs[0], ref) < 1e-2
    assert all(torch.equal(o, outs[0]) for o in outs)


@cuda_only
@pytest.mark.parametrize("n,k", [(2048, 4096), (1024, 2048)])
def test_fp8_w8a16_split_k_repeats_in_a_graph(n, k):
    """The split-K tickets under back-to-back calls at the model's shapes that small_m_tiles splits (out_proj
    swapped, the shared expert's gate_up unswapped; split 4 each at 32 rows): 48 calls in one CUDA graph, replayed
    twice, every output bit-equal to an eager call's, so no tile's last program ever sums a partial before it is
    visible."""
    from qnext.ops.triton_linear_fp8 import fp8_linear, small_m_tiles
    torch.manual_seed(n + k)
    w = quantize_fp8_block(torch.randn(n, k, device="cuda") / 45)
    x = torch.randn(32, k, device="cuda").bfloat16()
    tiles = small_m_tiles(32, n, k)
    assert tiles["split"] > 1
    want = fp8_linear(x, w, path="w8a16", tiles=tiles)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fp8_linear(x, w, path="w8a16", tiles=tiles)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fp8_linear(x, w, path="w8a16", tiles=tiles) for _ in range(48)]
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, want) for o in outs)


@cuda_only
def test_linear_gemv_matches_cublas():
    from qnext.ops.triton_linear_fp8 import linear
    torch.manual_seed(0)
    for n in (1, 64, 528, 4096):
        w = torch.randn(n, 2048, device="cuda").bfloat16() / 45
        for m in (1, 3):
            x = torch.randn(m, 2048, device="cuda").bfloat16()
            assert rel(linear(x, w), x.float() @ w.float().t()) < 1e-2


@cuda_only
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fp8", [True, False])
def test_gdn_decode_output_with_the_norm_in_out_proj(monkeypatch, m, fp8):
    """gdn_decode_project_ at the model's GDN shapes (16 key x 2 value heads of 128, z a strided view of the qkvz
    row, out_proj 2048 x 4096) takes the two-launch path (the norm kernel is patched out) and matches the three
    kernels apart: the same states, and outputs to bf16 rounding (the norm's output is rounded before its head
    scale instead of after); and the torch reference."""
    from qnext.ops import fp8_linear as reference, triton_fused_linear as fused
    torch.manual_seed(m)
    slots, init, cache, a_log, dt_bias = _slot_case(m, hk=16, hv=32)
    q, k = (torch.randn(m, 16, 128, device="cuda").bfloat16() for _ in range(2))
    v = torch.randn(m, 32, 128, device="cuda").bfloat16()
    a, b = torch.randn(m, 32, device="cuda").bfloat16(), torch.randn(m, 32, device="cuda").bfloat16()
    z = torch.randn(m, 16, 768, device="cuda").bfloat16()[..., 512:].unflatten(-1, (2, 128))
    nw = (torch.rand(128, device="cuda") + 0.5).bfloat16()
    w = torch.randn(2048, 4096, device="cuda") / 64
    w = quantize_fp8_block(w) if fp8 else w.bfloat16()
    args = (q, k, v, a, b, a_log, dt_bias)
    caches = [cache.clone() for _ in range(3)]
    monkeypatch.setattr(fused, "FUSE_OUT_NORM", False)
    apart = fused.gdn_decode_project_(*args, caches[0], slots, init, z, nw, 1e-6, w)
    monkeypatch.setattr(fused, "FUSE_OUT_NORM", True)
    monkeypatch.setattr(fused, "gated_rmsnorm", None)
    got = fused.gdn_decode_project_(*args, caches[1], slots, init, z, nw, 1e-6, w)
    want = reference.gdn_decode_project_(*args, caches[2], slots, init, z, nw, 1e-6, w)
    assert torch.equal(caches[0], caches[1])
    assert rel(got, apart) < 4e-3 and rel(got, want) < 1e-2


@cuda_only
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fp8", [True, False])
def test_fused_decode_projections_equal_the_separate_kernels(monkeypatch, m, fp8):
    """silu_mul_linear (alone and beside the routing: silu_mul_linear_route) and linear_pair at the model's shapes
    (shared expert I = 512 and its down projection; in_proj_qkvz with in_proj_ba, shared-expert gate_up with the
    padded router stack) equal the separate Triton kernels bit for bit (the same float32 ops and roundings per
    output; the routing's weights to float32 rounding), and the fused paths are the ones taken (the separate
    kernels are patched out). A plain 12288-row weight is past the GEMV's reach (cuBLAS): that pair
    falls back to two projections."""
    from qnext.ops import triton_fused_linear as fused
    from qnext.ops.triton_ffn import silu_mul
    from qnext.ops.triton_linear_fp8 import fp8_linear, gemv_takes, linear
    torch.manual_seed(m)

    def weight(n, k, quantized=True):
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        return quantize_fp8_block(w) if fp8 and quantized else w.bfloat16()

    def project(x, w):
        return fp8_linear(x, w) if isinstance(w, Fp8BlockWeight) else linear(x, w)

    gu = torch.randn(m, 1024, device="cuda").bfloat16()
    x = torch.randn(m, 2048, device="cuda").bfloat16()
    w_down = weight(2048, 512)
    pairs = [(weight(12288, 2048), weight(64, 2048, quantized=False)),
             (weight(1024, 2048), weight(528, 2048, quantized=False))]
    separate_swiglu = project(silu_mul(gu[:, :512], gu[:, 512:]), w_down)
    separate_pairs = [(project(x, a), project(x, b)) for a, b in pairs]
    fused_pairs = [gemv_takes(x, a, None) and gemv_takes(x, b, None) for a, b in pairs]
    assert fused_pairs == [fp8, True]
    for (a, b), (ya, yb), one_launch in zip(pairs, separate_pairs, fused_pairs):
        if not one_launch:
            got_a, got_b = fused.linear_pair(x, a, b)
            assert torch.equal(got_a, ya) and torch.equal(got_b, yb)
    logits = torch.randn(m, 512, device="cuda").bfloat16()
    separate_route = fused.moe_route(logits, 10, True)
    monkeypatch.setattr(fused, "silu_mul", None)
    monkeypatch.setattr(fused, "_project", None)
    monkeypatch.setattr(fused, "moe_route", None)
    assert torch.equal(fused.silu_mul_linear(gu[:, :512], gu[:, 512:], w_down), separate_swiglu)
    y, ids, weights = fused.silu_mul_linear_route(gu[:, :512], gu[:, 512:], w_down, None, logits, 10, True)
    assert torch.equal(y, separate_swiglu)
    assert torch.equal(ids, separate_route[0])     # the softmax sums over 4 warps there, 1 in moe_route's kernel
    torch.testing.assert_close(weights, separate_route[1], rtol=1e-6, atol=0)
    for (a, b), (ya, yb), one_launch in zip(pairs, separate_pairs, fused_pairs):
        if one_launch:
            got_a, got_b = fused.linear_pair(x, a, b)
            assert torch.equal(got_a, ya) and torch.equal(got_b, yb)


@cuda_only
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fp8", [True, False])
def test_in_proj_pair_with_conv_equals_the_separate_kernels(monkeypatch, m, fp8):
    """linear_pair_conv_update_ at the GDN layer's shapes (in_proj_qkvz 12288 x 2048 with in_proj_ba 64 x 2048, the
    conv over the layer's q, k, v column map, one sequence without state) gives the separate GEMV pair + conv
    kernel's outputs and conv states. An fp8 in_proj takes the one-launch path (the separate kernels are patched
    out; the conv's float32 sums may contract into other FMAs, so a conv output may differ in its last bit); a
    plain 12288-row weight is past the GEMV's reach (cuBLAS), so that pair falls back to the separate kernels."""
    from qnext.config import ModelConfig
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.ops import triton_fused_linear as fused
    from qnext.ops.triton_conv1d import causal_conv1d_update_
    from qnext.weights.presets import preset_config
    torch.manual_seed(m)
    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config("qwen3-coder-next")), 0, dtype=torch.bfloat16,
                        device="meta")
    dev = torch.device("cuda")
    cols, chans = gdn.qkv_columns(dev), gdn.qkv_channels(dev)
    w = torch.randn(12288, 2048, device="cuda") / 45
    wq = quantize_fp8_block(w) if fp8 else w.bfloat16()
    wba = (torch.randn(64, 2048, device="cuda") / 45).bfloat16()
    x = torch.randn(m, 2048, device="cuda").bfloat16()
    cw = torch.randn(8192, 4, device="cuda").bfloat16()
    cache = torch.randn(8, 8192, 3, device="cuda").bfloat16()
    slots = torch.tensor([5, 1, 6][:m], device="cuda")
    init = torch.tensor([True, False, True][:m], device="cuda")
    y1, y2 = fused.linear_pair(x, wq, wba)
    apart_cache = cache.clone()
    apart = causal_conv1d_update_(y1, cw, apart_cache, slots, init, x_cols=cols)
    if fp8:
        monkeypatch.setattr(fused, "linear_pair", None)
        monkeypatch.setattr(fused, "causal_conv1d_update_", None)
    g1, g2, mixed = fused.linear_pair_conv_update_(x, wq, wba, cw, cache, slots, init, cols, chans)
    assert torch.equal(g1, y1) and torch.equal(g2, y2)
    assert (mixed != apart).float().mean().item() < 0.01
    torch.testing.assert_close(mixed, apart, rtol=1e-2, atol=1e-3)
    assert torch.equal(cache, apart_cache)


@cuda_only
def test_greedy_argmax_is_torch_argmax():
    """The two-stage Triton argmax gives torch.argmax's index (the first of a tie) for bf16 and float32 rows."""
    from qnext.ops.triton_sampling import greedy_argmax
    torch.manual_seed(0)
    x = torch.randn(5, 151936, device="cuda")
    x[1, 100000] = x[1, 3] = 9.0
    x[2, 4095] = x[2, 4096] = 9.0
    x[3, -1] = 9.0
    for t in (x, x.bfloat16(), x[:1].bfloat16()):
        assert torch.equal(greedy_argmax(t), t.argmax(-1))


@cuda_only
def test_attention_norm_pair_is_the_two_norms():
    """rmsnorm_rope_pair's one launch equals the two rmsnorm_rope launches bit for bit, at the model's head shapes
    (16 query heads of 256 interleaved with their gates, 2 key heads, rotary dim 64)."""
    from qnext.ops import triton_norm
    torch.manual_seed(0)
    for t in (1, 5):
        qkv = torch.randn(t, 16 * 512 + 2 * 256, device="cuda").bfloat16()
        q, k = qkv[:, :8192].view(t, 16, 512)[..., :256], qkv[:, 8192:].view(t, 2, 256)
        wq, wk = torch.randn(256, device="cuda").bfloat16(), torch.randn(256, device="cuda").bfloat16()
        cos, sin = torch.randn(t, 32, device="cuda"), torch.randn(t, 32, device="cuda")
        pair = triton_norm.rmsnorm_rope_pair(q, wq, k, wk, 1e-6, cos, sin)
        apart = triton_norm.rmsnorm_rope(q, wq, 1e-6, cos, sin), triton_norm.rmsnorm_rope(k, wk, 1e-6, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(pair, apart))


@cuda_only
def test_rope_cos_sin_matches_torch():
    """One Triton launch for the rotary cos / sin against torch's six float32 ops (both libdevice cosf / sinf)."""
    from qnext.ops import norm, triton_norm
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32, device="cuda") / 64)
    for pos in (torch.tensor([0, 5, 262143], device="cuda"), torch.arange(9000, device="cuda")):
        for got, want in zip(triton_norm.rope_cos_sin(pos, inv, 1.1), norm.rope_cos_sin(pos, inv, 1.1)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@cuda_only
def test_pack_to_device_round_trips_every_dtype():
    from qnext.engine.host_device import pack_to_device

    parts = [([1, 2, 3], torch.int64), ([], torch.int32), ([4, -5, 6, 7, 8], torch.int32), ([True, False], torch.bool),
             ([9], torch.int64), ([1, 2, 3, 4], torch.int32)]
    for (data, dtype), t in zip(parts, pack_to_device(parts, "cuda")):
        assert t.device.type == "cuda" and t.dtype == dtype
        assert t.cpu().tolist() == torch.tensor(data, dtype=dtype).tolist()


@cuda_only
def test_fp8_dequant_pass_is_the_reference_bit_for_bit():
    from qnext.ops.quant import dequantize_fp8_block
    from qnext.ops.triton_linear_fp8 import SMALL_M_MAX, dequantize_fp8, fp8_linear
    torch.manual_seed(0)
    w = quantize_fp8_block(torch.randn(384, 640, device="cuda") * 3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        poison_allocator()
        assert torch.equal(dequantize_fp8(w, dtype), dequantize_fp8_block(w, dtype))
    x = torch.randn(SMALL_M_MAX + 1003, 640, device="cuda").bfloat16()      # auto takes the dequant path here
    assert torch.equal(fp8_linear(x, w), torch.nn.functional.linear(x, dequantize_fp8_block(w, x.dtype)))


# ---- programmatic dependent launch -------------------------------------------------------------------------------

def test_pdl_is_off_without_cuda_or_when_asked():
    from qnext.ops import pdl
    with pdl.pdl_disabled():
        assert pdl.pdl_launch() == {"PDL": False}
    assert "QNEXT_PDL" not in os.environ
    if not CUDA:
        assert pdl.pdl_launch() == {"PDL": False}
    elif torch.cuda.get_device_capability()[0] >= 9:     # the H100 / H200 this repo measures on must use it
        assert pdl.pdl_launch() == {"PDL": True, "launch_pdl": True}


@cuda_only
def test_pdl_chain_replayed_in_a_cuda_graph_equals_plain_launches():
    """A decode-like chain of PDL kernels (each reading the one before), captured and replayed many times, gives
    the bits of the same kernels launched plainly: a missing wait would read a predecessor's output early."""
    from qnext.ops import pdl, triton_ffn, triton_norm
    from qnext.ops.triton_linear_fp8 import fp8_linear
    if not pdl.pdl_enabled():
        pytest.skip("PDL needs sm_90+ and a Triton with launch_pdl")
    torch.manual_seed(9)
    x = torch.randn(1, 2048, device="cuda").bfloat16()
    r = torch.randn(1, 2048, device="cuda").bfloat16()
    wn = torch.rand(2048, device="cuda").bfloat16()
    w1 = quantize_fp8_block(torch.randn(1024, 2048, device="cuda") / 2048 ** 0.5)
    w2 = quantize_fp8_block(torch.randn(512, 512, device="cuda") / 512 ** 0.5)

    def chain():
        y, s = triton_norm.rmsnorm(x, wn, 1e-6, residual=r)
        h = fp8_linear(y, w1, path="gemv")
        a = triton_ffn.silu_mul(h[:, :512], h[:, 512:])
        logits = fp8_linear(a, w2, path="gemv")
        ids, weights = triton_ffn.moe_route(logits.float(), 10, True)
        return s, logits, ids, weights

    with pdl.pdl_disabled():
        ref = chain()
    chain()                                            # compile the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(50):
        for t in out:
            t.zero_()
        graph.replay()
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
