"""Run by tests/test_triton_interpreter.py in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter):
our Triton kernels against their torch references on CPU tensors, then the tiny model's greedy tokens through the
Triton backend against the torch backend. Prints one JSON object {check: error or bool}.

Float32 inputs are exact up to reduction order; bf16 ones differ by the interpreter's rounding (it truncates where
the GPU rounds to nearest), so their bar is loose: the GPU parity tests (tests/test_gpu_ops.py) are the tight ones.
Not a test module itself (the name does not start with test_): the interpreter must be chosen before Triton
kernels are defined, which a shared pytest process cannot promise.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from paged_case import paged_case  # noqa: E402

from qnext.ops import causal_conv as ref_conv, moe as ref_ffn, norm as ref_norm  # noqa: E402
from qnext.ops import triton_conv1d, triton_ffn, triton_norm  # noqa: E402


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def op_checks() -> dict:
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        n = str(dt).split(".")[1]
        x, r = torch.randn(5, 3, 40, dtype=dt), torch.randn(5, 3, 40, dtype=dt)
        w = torch.randn(40, dtype=dt) * 0.1
        out[f"rmsnorm/{n}"] = err(triton_norm.rmsnorm(x, w, 1e-6), ref_norm.rmsnorm(x, w, 1e-6))
        (y1, s1), (y2, s2) = triton_norm.rmsnorm(x, w, 1e-6, r), ref_norm.rmsnorm(x, w, 1e-6, r)
        out[f"rmsnorm_residual/{n}"] = max(err(y1, y2), err(s1, s2))
        xs = torch.randn(4, 2, 120, dtype=dt)[..., 40:80]                 # strided rows, as q/k heads are
        zs = torch.randn(4, 3, 2, 40, dtype=dt)[:, 1:, 1]
        out[f"rmsnorm_strided/{n}"] = err(triton_norm.rmsnorm(xs, w, 1e-6), ref_norm.rmsnorm(xs, w, 1e-6))
        out[f"gated_rmsnorm/{n}"] = err(triton_norm.gated_rmsnorm(xs, zs, w, 1e-6),
                                        ref_norm.gated_rmsnorm(xs, zs, w, 1e-6))
        qh = torch.randn(6, 3, 2 * 40, dtype=dt)[..., :40]                 # q heads split from [q | gate]
        ang = torch.randn(6, 10)
        out[f"rmsnorm_rope/{n}"] = err(triton_norm.rmsnorm_rope(qh, w, 1e-6, ang.cos(), ang.sin()),
                                       ref_norm.rmsnorm_rope(qh, w, 1e-6, ang.cos(), ang.sin()))
        saved, triton_norm.MANY_ROWS = triton_norm.MANY_ROWS, 1          # several rows per program, as in prefill
        many = (triton_norm.rmsnorm(x, w, 1e-6, r), triton_norm.gated_rmsnorm(xs, zs, w, 1e-6),
                triton_norm.rmsnorm_rope(qh, w, 1e-6, ang.cos(), ang.sin()))
        triton_norm.MANY_ROWS = saved
        one = (triton_norm.rmsnorm(x, w, 1e-6, r), triton_norm.gated_rmsnorm(xs, zs, w, 1e-6),
               triton_norm.rmsnorm_rope(qh, w, 1e-6, ang.cos(), ang.sin()))
        out[f"norm_rows_bits/{n}"] = bool(all(torch.equal(a, b) for a, b in zip((*many[0], *many[1:]),
                                                                                (*one[0], *one[1:]))))
        logits = (torch.randperm(7 * 24).view(7, 24) / 50 - 1.5).to(dt)   # distinct in bf16 too: no ties to order
        for k, renorm in ((5, True), (3, False)):
            (i1, w1), (i2, w2) = triton_ffn.moe_route(logits, k, renorm), ref_ffn.moe_route(logits, k, renorm)
            out[f"moe_route_ids/k{k}/{n}"] = bool(torch.equal(i1, i2) and i1.dtype == torch.int64)
            out[f"moe_route_weights/k{k}/{n}"] = err(w1, w2)
        g, u = torch.randn(6, 50, dtype=dt), torch.randn(6, 50, dtype=dt)
        out[f"silu_mul/{n}"] = err(triton_ffn.silu_mul(g, u), ref_ffn.silu_mul(g.float(), u.float()))
        gate = torch.randn(6, 1, dtype=dt)
        out[f"sigmoid_gate_add/{n}"] = err(triton_ffn.sigmoid_gate_add(g, gate, u),
                                           ref_ffn.sigmoid_gate_add(g.float(), gate.float(), u.float()))
        per_expert = torch.randn(6, 3, 50, dtype=dt)                       # unsummed routed outputs [T, k, H]
        out[f"sigmoid_gate_add_sum/{n}"] = err(triton_ffn.sigmoid_gate_add(per_expert, gate, u),
                                               ref_ffn.sigmoid_gate_add(per_expert.float(), gate.float(),
                                                                        u.float()))
        from qnext.ops.norm import MoeCombine                               # the MoE output formed by the norm
        rg = torch.randn(6, 9, dtype=dt)[:, 8:]                            # a strided gate column
        res, wn = torch.randn(6, 50, dtype=dt), torch.randn(50, dtype=dt) * 0.1
        for routed in (per_expert, g):
            fused = triton_norm.rmsnorm(MoeCombine(routed, rg, u), wn, 1e-6, res)
            apart = triton_norm.rmsnorm(triton_ffn.sigmoid_gate_add(routed, rg, u), wn, 1e-6, res)
            ref = ref_norm.rmsnorm(MoeCombine(routed, rg, u), wn, 1e-6, res)
            out[f"rmsnorm_moe_combine_k{routed.dim()}/{n}"] = max(err(fused[0], ref[0]), err(fused[1], ref[1]))
            out[f"rmsnorm_moe_combine_bits_k{routed.dim()}/{n}"] = bool(torch.equal(fused[0], apart[0])
                                                                        and torch.equal(fused[1], apart[1]))
        gu = torch.randn(6, 100, dtype=dt)                                 # stacked [gate | up] projection
        out[f"silu_mul_halves/{n}"] = err(triton_ffn.silu_mul(gu[:, :50], gu[:, 50:]),
                                          ref_ffn.silu_mul(gu[:, :50].float(), gu[:, 50:].float()))
        rg = torch.randn(6, 25, dtype=dt)[:, 24:]                          # last column of [router | shared gate]
        out[f"sigmoid_gate_add_strided_gate/{n}"] = err(triton_ffn.sigmoid_gate_add(g, rg, u),
                                                        ref_ffn.sigmoid_gate_add(g.float(), rg.float(), u.float()))
    # conv: columns picked out of a wider input, slots, a sequence without initial state, one of a single token;
    # 80 tokens make blocks (32 tokens) without a sequence start (32-63) beside ones where a sequence starts mid-block
    c, k = 12, 4
    cols = torch.randperm(20)[:c].to(torch.int32)
    wt = torch.randn(c, k)
    cache1 = torch.randn(5, c, k - 1)
    cache2 = cache1.clone()
    slots, init = torch.tensor([3, 1, 4, 0]), torch.tensor([True, False, True, True])
    cu = torch.tensor([0, 4, 5, 66, 80], dtype=torch.int32)
    x = torch.randn(80, 20)
    y1 = triton_conv1d.causal_conv1d_prefill_(x, wt, cache1, slots, init, cu, x_cols=cols)
    y2 = ref_conv.causal_conv1d_prefill_(x, wt, cache2, slots, init, cu, x_cols=cols)
    out["conv_prefill"] = max(err(y1, y2), err(cache1, cache2))
    # the GDN layer's own column map, read by aligned runs (x_cols_run) out of in_proj_qkvz's output
    from qnext.config import ModelConfig
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.weights.presets import preset_config
    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config("tiny")), 0, dtype=torch.float32, device="meta")
    gcols = gdn.qkv_columns(torch.device("cpu"))
    xq = torch.randn(80, gdn.in_proj_qkvz.out_features)
    wq = torch.randn(gcols.numel(), k)
    cq1 = torch.randn(5, gcols.numel(), k - 1)
    cq2, cq3 = cq1.clone(), cq1.clone()
    y1 = triton_conv1d.causal_conv1d_prefill_(xq, wq, cq1, slots, init, cu, x_cols=gcols, x_cols_run=gdn.qkv_run)
    y2 = ref_conv.causal_conv1d_prefill_(xq, wq, cq2, slots, init, cu, x_cols=gcols)
    out["conv_prefill_column_runs"] = max(err(y1, y2), err(cq1, cq2))
    kd = gdn.hk * gdn.dk                                        # q, k, v as the GDN layer asks for them
    parts = triton_conv1d.causal_conv1d_prefill_(xq, wq, cq3, slots, init, cu, x_cols=gcols,
                                                 x_cols_run=gdn.qkv_run, split=(kd, kd))
    want = y2.split([kd, kd, y2.shape[1] - 2 * kd], dim=1)
    out["conv_prefill_split_q_k_v"] = (max(max(err(p1, p2) for p1, p2 in zip(parts, want)), err(cq3, cq2))
                                       if len(parts) == 3 and all(p.is_contiguous() for p in parts) else float("inf"))
    from qnext.ops import norm as ref_rope, triton_norm as tn
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    for name, pos in (("decode", torch.tensor([5, 70000, 3])), ("prefill", torch.arange(5000))):
        got, want = tn.rope_cos_sin(pos, inv, 1.25), ref_rope.rope_cos_sin(pos, inv, 1.25)
        out[f"rope_cos_sin_float32/{name}"] = max(err(got[0], want[0]), err(got[1], want[1]))
    qkv = torch.randn(2, 4 * 64 + 2 * 64).half()                 # q heads (stride 2D: gate between) and k heads
    q, k = qkv[:, :256].view(2, 2, 128)[..., :64], qkv[:, 256:].view(2, 2, 64)
    wq, wk = torch.randn(64).half(), torch.randn(64).half()
    cq, sq = torch.randn(2, 16), torch.randn(2, 16)
    pair = tn.rmsnorm_rope_pair(q, wq, k, wk, 1e-6, cq, sq)
    apart = tn.rmsnorm_rope(q, wq, 1e-6, cq, sq), tn.rmsnorm_rope(k, wk, 1e-6, cq, sq)
    out["rope_pair_bits"] = all(bool(torch.equal(a, b)) for a, b in zip(pair, apart))
    from qnext.ops.triton_sampling import greedy_argmax
    logits = torch.randn(3, 151936).half()
    logits[1, 70000] = logits[1, 9000] = 50.0                    # a tie across slices: the lower index wins
    logits[2, 4095] = logits[2, 4097] = 50.0                     # ... and across a slice edge
    out["greedy_argmax_equal"] = bool(torch.equal(greedy_argmax(logits), logits.float().argmax(-1)))
    xd = torch.randn(4, 20)
    y1 = triton_conv1d.causal_conv1d_update_(xd, wt, cache1, slots, init, x_cols=cols)
    y2 = ref_conv.causal_conv1d_update_(xd, wt, cache2, slots, init, x_cols=cols)
    out["conv_update"] = max(err(y1, y2), err(cache1, cache2))
    # fp8 block-scaled GEMV: K = 640 is 5 scale groups, not a power of two (the tiles must still be)
    from qnext.ops.quant import dequantize, quantize_fp8_block
    from qnext.ops.triton_linear_fp8 import dequantize_fp8, fp8_gemv, fp8_linear
    w8 = quantize_fp8_block(torch.randn(384, 640) / 640 ** 0.5)
    xg = torch.randn(3, 640)
    ref = xg @ dequantize(w8).t()
    out["fp8_gemv"] = err(fp8_gemv(xg, w8), ref)
    out["fp8_gemv_bn16_ng2"] = err(fp8_gemv(xg, w8, bn=16, ng=2), ref)
    from qnext.ops.triton_linear_fp8 import linear
    wp = torch.randn(70, 640).half()                # plain 16-bit weight, 70 outputs: the bf16_gemv route
    xp = torch.randn(2, 640).half()
    out["linear_gemv/fp16"] = err(linear(xp, wp).float(), xp.float() @ wp.float().t())
    # inputs formed in the GEMV's prologue (fp16: the interpreter's bf16 rounding truncates), fp8 and plain weights
    from qnext.ops import fp8_linear as ref_linear, triton_fused_linear as fused
    gu = torch.randn(3, 2 * 256).half()                                  # a stacked gate | up row, I = 256
    w_down8, w_down = quantize_fp8_block(torch.randn(384, 256) / 16), torch.randn(70, 256).half()
    for name, wd in (("fp8", w_down8), ("plain", w_down)):
        got = fused.silu_mul_linear(gu[:, :256], gu[:, 256:], wd)
        out[f"silu_mul_linear/{name}"] = err(got.float(), ref_linear.silu_mul_linear(
            gu[:, :256].float(), gu[:, 256:].float(), wd if name == "fp8" else wd.float()))
        logits = torch.randn(3, 60)                  # the routing beside it in one launch (60 experts, top-4)
        got, ids, ws = fused.silu_mul_linear_route(gu[:, :256], gu[:, 256:], wd, None, logits, 4, True)
        ref_ids, ref_ws = ref_ffn.moe_route(logits, 4, True)
        out[f"silu_mul_linear_route/{name}"] = max(err(got.float(), ref_linear.silu_mul_linear(
            gu[:, :256].float(), gu[:, 256:].float(), wd if name == "fp8" else wd.float())), err(ws, ref_ws))
        out[f"moe_route_ids/fused_{name}"] = bool(torch.equal(ids, ref_ids))
    xw = torch.randn(2, 640).half()                 # two GEMVs of one input in one launch, either format first
    for name, (w1, w2) in (("fp8+plain", (w8, wp)), ("plain+fp8", (wp, w8))):
        y1, y2 = fused.linear_pair(xw, w1, w2)
        r1, r2 = ref_linear.linear_pair(xw.float(), *(w if w is w8 else w.float() for w in (w1, w2)))
        out[f"linear_pair/{name}"] = max(err(y1.float(), r1), err(y2.float(), r2))
    # in_proj_qkvz with in_proj_ba and the decode conv of q, k, v in one launch (the small preset's GDN layout;
    # slot 0's sequence has no state): against the torch reference, and bit for bit against the separate kernels
    pgdn = GatedDeltaNet(ModelConfig.from_hf(preset_config("small")), 0, dtype=torch.float16, device="meta")
    pcols, pchans = pgdn.qkv_columns(torch.device("cpu")), pgdn.qkv_channels(torch.device("cpu"))
    xin, wba, cw = torch.randn(3, 256).half(), torch.randn(16, 256).half(), torch.randn(pcols.numel(), 4).half()
    pcache, pslots, pinit = torch.randn(6, pcols.numel(), 3).half(), torch.tensor([4, 0, 2]), torch.tensor([1, 0, 1])
    pinit = pinit > 0
    wq8 = quantize_fp8_block(torch.randn(pchans.numel(), 256) / 16)
    for name, wq in (("fp8", wq8), ("plain", dequantize(wq8).half())):
        pcaches = [pcache.clone() for _ in range(3)]
        got = fused.linear_pair_conv_update_(xin, wq, wba, cw, pcaches[0], pslots, pinit, pcols, pchans)
        want = ref_conv.linear_pair_conv_update_(xin.float(), wq if name == "fp8" else wq.float(), wba.float(),
                                                 cw.float(), pcaches[1], pslots, pinit, pcols, pchans)
        out[f"linear_pair_conv/{name}"] = max(max(err(a.float(), b.float()) for a, b in zip(got, want)),
                                              err(pcaches[0].float(), pcaches[1].float()))
        y1, y2 = fused.linear_pair(xin, wq, wba)
        apart = (y1, y2, triton_conv1d.causal_conv1d_update_(y1, cw, pcaches[2], pslots, pinit, x_cols=pcols))
        out[f"linear_pair_conv_bits/{name}"] = bool(all(torch.equal(a, b) for a, b in zip((*got, pcaches[0]),
                                                                                        (*apart, pcaches[2]))))
    # the GDN decode output (recurrence, gated RMSNorm finished in out_proj by a scale per head): 3 rows of 2 key x
    # 2 value heads of 128, z a strided view of a wider row as in qkvz, slot 0's sequence without state; against the
    # torch reference, and against the Triton kernels apart (the norm's output is rounded before its head scale)
    gq, gk, gv = torch.randn(3, 2, 128).half(), torch.randn(3, 2, 128).half(), torch.randn(3, 4, 128).half()
    ga, gb, galog, gdtb = torch.randn(3, 4).half(), torch.randn(3, 4).half(), torch.randn(4) * 0.5, torch.randn(4)
    gz = torch.randn(3, 2, 5, 128).half()[:, :, 3:]
    gnw, gcache = torch.rand(128).half() + 0.5, torch.randn(6, 4, 128, 128) / 8
    gslots, ginit = torch.tensor([4, 0, 2]), torch.tensor([True, False, True])
    wo8 = quantize_fp8_block(torch.randn(256, 512) / 512 ** 0.5)
    default = fused.FUSE_OUT_NORM
    for name, wo in (("fp8", wo8), ("plain", dequantize(wo8).half())):
        gcaches = [gcache.clone() for _ in range(3)]
        fused.FUSE_OUT_NORM = True
        args = (gq, gk, gv, ga, gb, galog, gdtb)
        got = fused.gdn_decode_project_(*args, gcaches[0], gslots, ginit, gz, gnw, 1e-6, wo)
        want = ref_linear.gdn_decode_project_(*args, gcaches[1], gslots, ginit, gz, gnw, 1e-6, wo)
        out[f"out_proj_norm/{name}"] = max(err(got.float(), want.float()), err(gcaches[0], gcaches[1]))
        fused.FUSE_OUT_NORM = False
        apart = fused.gdn_decode_project_(*args, gcaches[2], gslots, ginit, gz, gnw, 1e-6, wo)
        out[f"out_proj_norm_apart/{name}"] = max(err(got.float(), apart.float()), err(gcaches[0], gcaches[2]))
    fused.FUSE_OUT_NORM = default
    # prefill: the dequantizing pass (float32 here: this interpreter truncates bf16 conversions) and its linear
    out["fp8_dequant_float32"] = err(dequantize_fp8(w8, torch.float32), dequantize(w8))
    out["fp8_linear_dequant"] = err(fp8_linear(xg, w8, path="dequant"), ref)
    # decode batches (auto: w8a16 tl.dot with small tiles); fp16, as this interpreter's bf16 tl.dot is wrong
    xh = torch.randn(20, 640).half()
    out["linear_fp8_small_m/fp16"] = err(fp8_linear(xh, w8).float(), xh.float() @ dequantize(w8).t())
    from qnext.ops.triton_linear_fp8 import small_m_tiles      # split-K over K = 512 (4 scale blocks)
    w4 = quantize_fp8_block(torch.randn(256, 512) / 512 ** 0.5)
    xs = torch.randn(20, 512).half()
    for swap in (False, True):                      # swap: the weights as the MMA's first operand
        for split in (2, 4):
            tiles = {**small_m_tiles(20, 256, 512, swap=swap), "split": split}
            for _ in range(2):                      # twice: the tickets are back at zero after a call
                got = fp8_linear(xs, w4, path="w8a16", tiles=tiles).float()
            out[f"linear_fp8_small_m_split{split}{'_swap' if swap else ''}/fp16"] = err(
                got, xs.float() @ dequantize(w4).t())
    out.update(moe_checks())
    out.update(attention_and_gdn_checks())
    return out


def attention_and_gdn_checks() -> dict:
    """Paged attention (decode with several splits, prefill chunks over cached context) and the fused GDN decode
    step with its state in place at slots, float32."""
    from qnext.ops import delta_rule, paged_attention, triton_paged_attention
    from qnext.ops.fla_gdn import gdn_decode_

    out = {}
    for name, ctx, qlens in (("decode", [0, 16, 140, 299], [1, 1, 1, 1]), ("prefill", [0, 37, 5], [10, 6, 1])):
        case = paged_case(ctx, qlens, 16, hq=4, hkv=2, d=32)
        mine = dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
        ref = paged_attention.paged_attention(**dict(case, k_cache=case["k_cache"].clone(),
                                                     v_cache=case["v_cache"].clone()))
        out[f"paged_attention_{name}"] = err(triton_paged_attention.paged_attention(**mine), ref)
        ref_cache = case["k_cache"].clone()
        paged_attention.write_kv(case["k"], case["v"], ref_cache, case["v_cache"].clone(), case["slot_mapping"])
        out[f"paged_kv_write_{name}"] = err(mine["k_cache"], ref_cache)
        gated = paged_case(ctx, qlens, 16, hq=4, hkv=2, d=32, gated=True)
        ref = paged_attention.paged_attention(**dict(gated, k_cache=gated["k_cache"].clone(),
                                                     v_cache=gated["v_cache"].clone()))
        out[f"paged_attention_{name}_gated"] = err(triton_paged_attention.paged_attention(**gated), ref)
        if name == "decode":
            o = triton_paged_attention.paged_decode_attention(gated["q"], gated["k_cache"], gated["v_cache"],
                                                              gated["block_tables"], gated["seq_lens"],
                                                              gated["scale"], max_seq_len=300, num_splits=3,
                                                              gate=gated["gate"])
            out["paged_attention_decode_gated_splits3"] = err(o, ref)
        ref = paged_attention.paged_attention(**dict(case, k_cache=case["k_cache"].clone(),
                                                     v_cache=case["v_cache"].clone()))
        if name == "decode":  # the split-K path (what long contexts use), several split counts
            for splits in (1, 3, 8):
                o = triton_paged_attention.paged_decode_attention(case["q"], mine["k_cache"], mine["v_cache"],
                                                                  case["block_tables"], case["seq_lens"],
                                                                  case["scale"], max_seq_len=300, num_splits=splits)
                out[f"paged_attention_decode_splits{splits}"] = err(o, ref)
    # an fp8 (e4m3) cache: the decode kernel widens the pages to fp16 for its dots. Its write is checked
    # on the GPU only (tests/test_gpu_ops.py): the interpreter's float32 -> e4m3 cast is wrong (0.485 -> 0.25)
    case = paged_case([16, 140, 299], [1, 1, 1], 16, hq=4, hkv=2, d=32)
    kc, vc = (paged_attention.to_cache_dtype(case[c], torch.float8_e4m3fn) for c in ("k_cache", "v_cache"))
    args = (case["block_tables"], case["seq_lens"], case["scale"])
    out["kv_fp8_paged_decode"] = err(                  # fp16 dots over an fp8 cache: not exact
        triton_paged_attention.paged_decode_attention(case["q"], kc, vc, *args, max_seq_len=300, num_splits=3),
        triton_paged_attention.paged_decode_attention(case["q"], kc.float(), vc.float(), *args, max_seq_len=300))
    n, hk, hv, dk, dv, slots_total = 3, 2, 4, 16, 16, 6
    q, k = torch.randn(n, hk, dk), torch.randn(n, hk, dk)
    v, a, b = torch.randn(n, hv, dv), torch.randn(n, hv), torch.randn(n, hv)
    a_log, dt_bias = torch.randn(hv) * 0.5, torch.randn(hv) * 0.5
    cache = torch.randn(slots_total, hv, dk, dv)
    slots, init = torch.tensor([4, 0, 2]), torch.tensor([True, False, True])
    mine, ref_cache = cache.clone(), cache.clone()
    o = gdn_decode_(q, k, v, a, b, a_log, dt_bias, mine, slots, init)
    o_ref = delta_rule.gdn_decode_(q, k, v, a, b, a_log, dt_bias, ref_cache, slots, init)
    out["gdn_decode"] = max(err(o, o_ref), err(mine, ref_cache))
    mine, ref_cache = cache.bfloat16(), cache.bfloat16()             # bf16 state storage, float32 math
    o = gdn_decode_(q, k, v, a, b, a_log, dt_bias, mine, slots, init)
    o_ref = delta_rule.gdn_decode_(q, k, v, a, b, a_log, dt_bias, ref_cache, slots, init)
    out["bf16_state_gdn_decode"] = max(err(o, o_ref), err(mine.float(), ref_cache.float()))
    return out


def moe_checks() -> dict:
    """fused_moe's GEMV and grouped (decode) and sorted grouped-GEMM (prefill) paths for the three weight formats
    (grouped at 70 tokens: 140 pairs over 8 experts, so each expert's pairs take several 16-row chunks), and
    group_pairs against a torch grouping. fp16
    activations: this interpreter's tl.dot is wrong for bf16 operands (a plain 16x16 bf16 dot is off by 1e10),
    right for fp16 and float32."""
    from qnext.ops.quant import INT4_TILE_ROWS, quantize_fp8_block, quantize_int4_group, tile_int4
    from qnext.ops.triton_moe import fused_moe
    from qnext.ops.triton_moe_grouped import group_pairs

    e, h, inter, k = 8, 256, 128, 2
    w13f, w2f = torch.randn(e, 2 * inter, h) / 16, torch.randn(e, h, inter) / 16
    int4 = quantize_int4_group(w13f, 128), quantize_int4_group(w2f, 128)
    formats = {"fp16": (w13f.half(), w2f.half(), w13f, w2f), "int4": int4,
               "int4 tiles": (tile_int4(int4[0], INT4_TILE_ROWS), tile_int4(int4[1], INT4_TILE_ROWS), *int4),
               "fp8": (quantize_fp8_block(w13f), quantize_fp8_block(w2f))}
    out = {}
    for name, ws in formats.items():
        w13, w2 = ws[:2]
        ref13, ref2 = ws[2:] if len(ws) == 4 else ws
        for m, path in ((1, "gemv"), (5, "sorted"), (3, "grouped"), (70, "grouped")):
            x = torch.randn(m, h).half()
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(m)])
            tw = torch.rand(m, k)
            ref = ref_ffn.fused_moe(x.float(), ref13, ref2, tw, ids)
            tag = f"{path}{m}" if path == "grouped" else path
            out[f"fused_moe_{tag}/{name}"] = err(fused_moe(x, w13, w2, tw, ids, path=path), ref)
            parts = fused_moe(x, w13, w2, tw, ids, path=path, reduce=False)
            out[f"fused_moe_{tag}_unreduced/{name}"] = err(parts.float().sum(1) if parts.dim() == 3 else parts, ref)
    # the sorted path's other operand orders: int4 unswapped, fp8 with both GEMMs swapped (70 tokens: several
    # 16-row blocks per expert)
    x = torch.randn(70, h).half()
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(70)])
    tw = torch.rand(70, k)
    ref = ref_ffn.fused_moe(x.float(), *int4, tw, ids)
    ref5 = ref_ffn.fused_moe(x[:5].float(), *int4, tw[:5], ids[:5])
    for name in ("int4", "int4 tiles"):
        ws = formats[name][:2]
        out[f"moe_sorted70_unswapped/{name}"] = err(fused_moe(x, *ws, tw, ids, path="sorted",
                                                              config=dict(bm=16, swap=False, swap2=False)), ref)
        for tag, cfg in (("looped", dict(split=False)), ("cores_looped", dict(split=False, mma=False)),
                         ("cores_split", dict(mma=False))):                 # int4 GEMV over its k experts / CUDA cores
            out[f"moe_gemv_{tag}5/{name}"] = err(fused_moe(x[:5], *ws, tw[:5], ids[:5], path="gemv", config=cfg),
                                                 ref5)
    ref = ref_ffn.fused_moe(x[:1].float(), *formats["fp8"], tw[:1], ids[:1])     # fp8 GEMV on tensor cores
    out["moe_gemv_mma1/fp8"] = err(fused_moe(x[:1], *formats["fp8"], tw[:1], ids[:1], path="gemv",
                                             config=dict(mma=True)), ref)
    out["moe_gemv_cores1/fp8"] = err(fused_moe(x[:1], *formats["fp8"], tw[:1], ids[:1], path="gemv",
                                               config=dict(mma=False)), ref)     # split mode on CUDA cores
    ref = ref_ffn.fused_moe(x.float(), *formats["fp8"], tw, ids)      # fp8 with both GEMMs swapped
    out["moe_sorted70_swapped/fp8"] = err(fused_moe(x, *formats["fp8"], tw, ids, path="sorted",
                                                    config=dict(bm=16, swap=True, swap2=True)), ref)
    w13n, w2n = torch.randn(e, 2 * 96, 96) / 16, torch.randn(e, 96, 96) / 16    # 96 rows: grouped tiles shrink to fit
    w13n, w2n = quantize_int4_group(w13n, 32), quantize_int4_group(w2n, 32)
    xn, idn = torch.randn(20, 96).half(), torch.stack([torch.randperm(e)[:k] for _ in range(20)])
    twn = torch.rand(20, k)
    refn = ref_ffn.fused_moe(xn.float(), w13n, w2n, twn, idn)
    out["moe_grouped_narrow/int4"] = err(fused_moe(xn, w13n, w2n, twn, idn, path="grouped"), refn)
    out["moe_grouped_narrow/int4 tiles"] = err(fused_moe(xn, tile_int4(w13n, 32), tile_int4(w2n, 32), twn, idn,
                                                         path="grouped"), refn)
    ids = torch.stack([torch.randperm(12)[:3] for _ in range(40)])     # 120 pairs: some experts fill 2 slots
    slot_e, slot_cnt, slot_pairs, used = group_pairs(ids, 12)
    flat, n = ids.reshape(-1), int(used)
    got: dict[int, list[int]] = {}
    for s in range(n):
        got.setdefault(int(slot_e[s]), []).extend(slot_pairs[s, :slot_cnt[s]].tolist())
    out["moe_group_pairs_ids"] = (list(got) == flat.unique().tolist()
                                  and all(1 <= int(c) <= slot_pairs.shape[1] for c in slot_cnt[:n])
                                  and all(got[ex] == (flat == ex).nonzero().flatten().tolist() for ex in got))
    return out


def model_check() -> dict:
    """Greedy tokens of the tiny float32 model: every op through the Triton backend vs the torch backend. fla-core
    (the chunked GDN prefill) is a GPU package, so prefill's delta rule stays the torch reference; the routed
    experts take the torch path in float32 (their kernels want 16-bit activations)."""
    from qnext import LLM, SamplingParams
    from qnext.ops import registry
    from qnext.weights.checkpoint_writer import write_checkpoint

    registry.resolve_backend("triton", "cpu")
    for op in ("gdn_prefill_", "chunk_gated_delta_rule"):
        registry._impls[(op, "triton")] = registry._impls[(op, "torch")]
    path = write_checkpoint(tempfile.mkdtemp() + "/tiny", "tiny", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 70, 1)]
    tokens = {}
    for backend in ("torch", "triton"):
        registry._resolved[("auto", "cpu")] = backend
        llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=256, block_size=4)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return {"model_greedy_equal": tokens["torch"] == tokens["triton"], "tokens": tokens}


if __name__ == "__main__":
    torch.manual_seed(0)
    result = op_checks()
    if "--model" in sys.argv:
        result.update(model_check())
    print(json.dumps(result))
