#!/usr/bin/env python3
"""One run on the GPU machine: parity of every fast op at full model size, then timings.

    python3 scripts/gpu_check.py --out $OUT [--budget 300]
        [--only moe,gdn,conv,attn,attnsplit,fp8,fp8gemv,fused,fp8small,fp8prefill,grouped]

Measures the two ceilings first (device-to-device copy GB/s counting read + write; bf16 8192^3 matmul TFLOP/s),
then for each op: time per call (CUDA-graph replays of many calls over rotating inputs for decode-sized work, CUDA
events for prefill-sized work, median of repeats), bytes it must move or FLOPs it must do, and % of the ceiling.
Synthetic weights (random, router uniform). Writes gpu_check.json + gpu_check.md under --out; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qnext.ops import quant  # noqa: E402

H, I, E, TOPK = 2048, 512, 512, 10
HK, HV, DK, DV, CONV = 16, 32, 128, 128, 8192
HQ, HKV, HD = 16, 2, 256

RESULTS: dict = {"parity": {}, "timing": {}, "env": {}, "errors": {}}
ROWS: list[tuple] = []
T0 = time.time()
BUDGET = 300.0
DECODE_ONLY = False


def left() -> float:
    return BUDGET - (time.time() - T0)


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def parity(name: str, value: float, tol: float) -> None:
    ok = value < tol
    RESULTS["parity"][name] = {"rel_err": value, "tol": tol, "ok": ok}
    print(f"[parity] {name:55s} rel {value:.2e}  (tol {tol:.0e}) {'OK' if ok else 'FAIL'}", flush=True)


def record(name: str, us: float, bytes_: float | None = None, flops: float | None = None, note: str = "") -> None:
    bw = RESULTS["env"].get("copy_GBps")
    tf = RESULTS["env"].get("matmul_TFLOPs")
    d = {"us": us}
    extra = ""
    if bytes_:
        gbps = bytes_ / us / 1e3
        d.update(bytes=bytes_, GBps=gbps, pct_bw=100 * gbps / bw if bw else None)
        extra += f" {gbps:7.0f} GB/s ({d['pct_bw']:.0f}% of copy)"
    if flops:
        tfs = flops / us / 1e6
        d.update(flops=flops, TFLOPs=tfs, pct_mm=100 * tfs / tf if tf else None)
        extra += f" {tfs:6.1f} TFLOP/s ({d['pct_mm']:.0f}% of mm)"
    if note:
        d["note"] = note
    RESULTS["timing"][name] = d
    ROWS.append((name, us, extra, note))
    print(f"[time] {name:58s} {us:9.1f} us{extra} {note}", flush=True)


def guard(section: str):
    def deco(fn):
        def run(*a, **kw):
            if left() < 20:
                RESULTS["errors"][section] = "skipped: out of budget"
                print(f"[skip] {section}: out of budget", flush=True)
                return None
            t = time.time()
            try:
                return fn(*a, **kw)
            except Exception as e:  # keep going: one broken op must not hide the others' numbers
                RESULTS["errors"][section] = f"{type(e).__name__}: {e}"
                print(f"[error] {section}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
            finally:
                print(f"[section] {section} took {time.time() - t:.1f}s, {left():.0f}s left", flush=True)
        return run
    return deco


# ---- timing --------------------------------------------------------------------------------------------------------

def time_graph(fn, n_inputs: int, reps: int = 24, replays: int = 7) -> float:
    """Median per-call microseconds of `reps` calls fn(i % n_inputs) captured in one CUDA graph."""
    for i in range(min(n_inputs, 3)):
        fn(i)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % n_inputs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del graph
    return statistics.median(times)


def time_events(fn, n_inputs: int = 1, iters: int = 7) -> float:
    fn(0)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i % n_inputs)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


# ---- environment and ceilings ---------------------------------------------------------------------------------------

def env() -> None:
    e = RESULTS["env"]
    try:
        e["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                                          "clocks.max.sm,clocks.mem", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as err:
        e["nvidia_smi"] = repr(err)
    import triton
    e.update(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
             sms=torch.cuda.get_device_properties(0).multi_processor_count,
             date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    try:
        import fla
        e["fla"] = getattr(fla, "__version__", "?")
    except Exception as err:
        e["fla"] = repr(err)
    src = torch.randn(256 << 20, device="cuda")            # 1 GiB
    dst = torch.empty_like(src)
    us = time_events(lambda i: dst.copy_(src), iters=9)
    e["copy_GBps"] = 2 * src.numel() * 4 / us / 1e3
    a = torch.randn(8192, 8192, device="cuda").bfloat16()
    b = torch.randn(8192, 8192, device="cuda").bfloat16()
    us = time_events(lambda i: a @ b, iters=9)
    e["matmul_TFLOPs"] = 2 * 8192 ** 3 / us / 1e6
    del src, dst, a, b
    print(f"[env] {e}", flush=True)


# ---- MoE -----------------------------------------------------------------------------------------------------------

def make_layer(kind: str, gen_seed: int):
    torch.manual_seed(gen_seed)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda") / I ** 0.5).bfloat16()
    if kind == "bf16":
        return w13, w2
    if kind == "fp8":
        out = quant.quantize_fp8_block(w13), quant.quantize_fp8_block(w2)
    else:                                       # int4 in the tiled storage of an engine that batches
        g, t = int(kind.split("_")[1]), quant.INT4_TILE_ROWS
        out = tuple(quant.tile_int4(quant.quantize_int4_group(w, g), t) for w in (w13, w2))
    del w13, w2
    torch.cuda.empty_cache()
    return out


def expert_bytes(w13, w2) -> float:
    from qnext.ops.triton_moe import _nbytes
    return (_nbytes(w13) + _nbytes(w2)) / E


def routings(m: int, n: int, seed: int = 0):
    """n random uniform routings of m tokens: (weights [m, k] f32, ids [m, k] int32)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(m, E, device="cuda", generator=g)
        out.append(quant.select_experts(logits, TOPK))
    return out


@guard("moe")
def moe_section(kinds, quick: bool) -> None:
    from qnext.ops.triton_moe import fused_moe
    # b1 GEMV tile variants (the first and last entries repeat the default: their spread is the noise)
    sweeps = {
        "bf16": [dict(split=False), dict(sbn1=8), dict(sbn2=32), None],
        "fp8": [dict(split=False), dict(sbn1=8), dict(sbn2=32), dict(mma=True), dict(mma=True, mbm2=4),
                dict(mma=True, mks2=64), None],
        "int4_128": [dict(mma=False), dict(mma=False, split=False), dict(mbm1=2), dict(mbm1=4, mw1=4),
                     dict(mbm1=2, mw1=2), dict(mbm2=4), dict(mbm2=16, mw2=4), dict(mbm2=2), dict(mks2=64),
                     dict(mks2=16), dict(mst=1), dict(mst=3), dict(split=False), None],
        "int4_32": [dict(mma=False)],
    }
    grouped_sweeps = [dict(bn=16), dict(bn=64), dict(bn2=32), dict(bn2=128), dict(stages=2, stages2=2),
                      dict(stages=4, stages2=4), dict(warps=2, warps2=2)]
    prefill_sweeps = {
        "bf16": [None, dict(bn=64, stages=3, bn2=64, stages2=3)],
        "fp8": [None, dict(bn2=64, warps2=4, stages2=3)],
        "int4_128": [None, dict(bn=32, warps=4, stages=3), dict(bn2=64, warps2=4, stages2=3)],
        "int4_32": [None],
    }
    for kind in kinds:
        if left() < 40:
            break
        layers = [make_layer(kind, s) for s in (1, 2)]
        per_expert = expert_bytes(*layers[0])
        # parity at full size
        for m, path in ((1, "gemv"), (8, "gemv"), (8, "sorted"), (32, "sorted"), (32, "gemv"), (1, "grouped"),
                        (32, "grouped"), (200, "grouped")):
            w, ids = routings(m, 1, seed=100 + m)[0]
            x = torch.randn(m, H, device="cuda").bfloat16()
            ref = quant.moe_forward_ref(x, *layers[0], w, ids, h_dtype=torch.bfloat16)
            parity(f"moe {kind} {path} M={m}", rel(fused_moe(x, *layers[0], w, ids, path=path), ref), 1.5e-2)
        # decode timings, rotating over 2 layers x 8 routings (so L2 never holds the experts of the next call)
        for m in (1, 8, 32, 64):
            routes = routings(m, 8, seed=m)
            xs = [torch.randn(m, H, device="cuda").bfloat16() for _ in range(4)]
            uniq = statistics.mean(int(torch.unique(r[1]).numel()) for r in routes)
            nbytes = uniq * per_expert
            paths = ["gemv", "grouped", "sorted"]
            for path in paths:
                cfgs = [None] + (sweeps[kind] if (m == 1 and path == "gemv" and not quick) else [])
                if path == "grouped" and not quick:
                    cfgs += grouped_sweeps
                if m > 1 and path == "gemv" and kind != "bf16":     # the other kernel family
                    cfgs.append(dict(mma=kind == "fp8"))
                if m > 1 and path == "gemv":
                    cfgs.append(dict(split=True))
                for cfg in cfgs:
                    if left() < 30:
                        break

                    def call(i, path=path, cfg=cfg):
                        wt, ids = routes[i % 8]
                        return fused_moe(xs[i % 4], *layers[i % 2], wt, ids, path=path, config=cfg)
                    try:
                        us = time_graph(call, 16)
                    except Exception as e:
                        RESULTS["errors"][f"moe {kind} {path} M={m} {cfg}"] = repr(e)
                        print(f"[error] moe {kind} {path} M={m} {cfg}: {e}", flush=True)
                        continue
                    tag = "" if cfg is None else " " + ",".join(f"{k}={v}" for k, v in cfg.items())
                    record(f"moe {kind} decode M={m} {path}{tag}", us, bytes_=nbytes,
                           note=f"{uniq:.0f} experts x {per_expert / 2**20:.2f} MiB")
        # prefill 8K
        if left() > 40 and not DECODE_ONLY:
            m = 8192
            wt, ids = routings(m, 1, seed=7)[0]
            x = torch.randn(m, H, device="cuda").bfloat16()
            flops = 2 * m * TOPK * 3 * H * I
            ref = quant.moe_forward_ref(x[:512], *layers[0], wt[:512], ids[:512], h_dtype=torch.bfloat16)
            parity(f"moe {kind} sorted M=512 (prefill tiles)",
                   rel(fused_moe(x[:512], *layers[0], wt[:512], ids[:512], path="sorted"), ref), 1.5e-2)
            for cfg in prefill_sweeps[kind]:
                if left() < 30:
                    break
                try:
                    us = time_events(lambda i, cfg=cfg: fused_moe(x, *layers[i % 2], wt, ids, path="sorted",
                                                                   config=cfg or None), n_inputs=2, iters=5)
                except Exception as e:
                    RESULTS["errors"][f"moe {kind} prefill {cfg}"] = repr(e)
                    print(f"[error] moe {kind} prefill {cfg}: {e}", flush=True)
                    continue
                tag = "" if not cfg else " " + ",".join(f"{k}={v}" for k, v in cfg.items())
                record(f"moe {kind} prefill M=8192 sorted{tag}", us, flops=flops,
                       note=f"weights once: {E * per_expert / RESULTS['env']['copy_GBps'] / 1e3:.0f} us")
            m2 = 2048                                      # a chunked-prefill step
            us = time_events(lambda i: fused_moe(x[:m2], *layers[i % 2], wt[:m2], ids[:m2], path="sorted"),
                             n_inputs=2, iters=5)
            record(f"moe {kind} prefill M=2048 sorted", us, flops=flops * m2 / m)
        del layers
        torch.cuda.empty_cache()
    # dense bf16 baseline: the same FLOPs as one expert-group GEMM, through cuBLAS
    a = torch.randn(8192 * TOPK // 8, H, device="cuda").bfloat16()
    b = torch.randn(2 * I * 8, H, device="cuda").bfloat16()
    us = time_events(lambda i: a @ b.t(), iters=5)
    record("ref cuBLAS bf16 [10240x2048]x[2048x8192]", us, flops=2 * a.shape[0] * H * b.shape[0])


# ---- GDN -----------------------------------------------------------------------------------------------------------

@guard("gdn")
def gdn_section(quick: bool) -> None:
    from qnext.ops import delta_rule
    from qnext.ops.fla_gdn import (chunk_gated_delta_rule, fla_recurrent_gated_delta_rule, gdn_decode_, gdn_gates,
                                   gdn_prefill_)
    torch.manual_seed(0)
    a_log = torch.empty(HV, device="cuda").uniform_(-4, -0.7)
    dt_bias = torch.randn(HV, device="cuda") * 0.5
    # prefill 8K, one sequence, fla chunk vs torch chunked reference
    t = 8192
    q = torch.randn(1, t, HK, DK, device="cuda").bfloat16()
    k = torch.randn(1, t, HK, DK, device="cuda").bfloat16()
    v = torch.randn(1, t, HV, DV, device="cuda").bfloat16()
    a, b = torch.randn(t, HV, device="cuda"), torch.randn(t, HV, device="cuda")
    g, beta = gdn_gates(a, b, a_log, dt_bias)
    h0 = torch.randn(1, HV, DK, DV, device="cuda") * 0.3
    ref_o, ref_s = delta_rule.chunk_gated_delta_rule(q, k, v, g[None], beta[None], initial_state=h0,
                                                     use_qk_l2norm_in_kernel=True)
    o, s = chunk_gated_delta_rule(q, k, v, g[None], beta[None], initial_state=h0, use_qk_l2norm_in_kernel=True)
    parity("gdn fla chunk T=8192 out", rel(o, ref_o), 2e-2)
    parity("gdn fla chunk T=8192 state", rel(s, ref_s), 2e-2)
    us = time_events(lambda i: chunk_gated_delta_rule(q, k, v, g[None], beta[None], initial_state=h0,
                                                      use_qk_l2norm_in_kernel=True), iters=7)
    record("gdn prefill fla chunk T=8192 (1 layer)", us, note=f"x36 layers = {36 * us / 1e3:.1f} ms")
    slots = torch.tensor([3], device="cuda")
    init = torch.tensor([True], device="cuda")
    cache = torch.randn(8, HV, DK, DV, device="cuda")
    cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    us = time_events(lambda i: gdn_prefill_(q[0], k[0], v[0], a, b, a_log, dt_bias, cache, slots, init, cu),
                     iters=7)
    record("gdn prefill gdn_prefill_ (gates + slots + fla) T=8192", us)
    del q, k, v, a, b, g, beta, o, s, ref_o, ref_s
    # decode: our kernel over slots vs fla fused_recurrent + gather/scatter
    num_slots = 64
    cache = torch.randn(num_slots, HV, DK, DV, device="cuda") * 0.3
    for n in (1, 8, 32):
        q = torch.randn(n, HK, DK, device="cuda").bfloat16()
        k = torch.randn(n, HK, DK, device="cuda").bfloat16()
        v = torch.randn(n, HV, DV, device="cuda").bfloat16()
        a, b = torch.randn(n, HV, device="cuda"), torch.randn(n, HV, device="cuda")
        slots = torch.randperm(num_slots, device="cuda")[:n]
        init = torch.ones(n, dtype=torch.bool, device="cuda")
        g, beta = gdn_gates(a, b, a_log, dt_bias)
        h0 = cache[slots].clone()
        ref_o, ref_s = delta_rule.recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None],
                                                             beta[:, None], initial_state=h0,
                                                             use_qk_l2norm_in_kernel=True)
        work = cache.clone()
        o = gdn_decode_(q, k, v, a, b, a_log, dt_bias, work, slots, init)
        parity(f"gdn decode ours B={n} out", rel(o, ref_o[:, 0]), 1e-2)
        parity(f"gdn decode ours B={n} state", rel(work[slots], ref_s), 1e-4)
        o2, s2 = fla_recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                                initial_state=h0, use_qk_l2norm_in_kernel=True)
        parity(f"gdn decode fla B={n} out", rel(o2[:, 0], ref_o[:, 0]), 1e-2)
        nbytes = 2 * n * HV * DK * DV * 4
        caches = [torch.randn(num_slots, HV, DK, DV, device="cuda") * 0.3 for _ in range(4)]  # 4 "layers"
        for bv in ((16, 32, 64) if not quick else (32,)):
            us = time_graph(lambda i, bv=bv: gdn_decode_(q, k, v, a, b, a_log, dt_bias, caches[i % 4], slots, init,
                                                         bv=bv), 4)
            record(f"gdn decode ours B={n} BV={bv}", us, bytes_=nbytes)

        def fla_call(i):
            c = caches[i % 4]
            g_, beta_ = gdn_gates(a, b, a_log, dt_bias)
            st = c.index_select(0, slots)
            o_, s_ = fla_recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g_[:, None], beta_[:, None],
                                                    initial_state=st, use_qk_l2norm_in_kernel=True)
            c.index_copy_(0, slots, s_)
        us = time_graph(fla_call, 4)
        record(f"gdn decode fla+gather/scatter+gates B={n}", us, bytes_=nbytes)


# ---- conv ----------------------------------------------------------------------------------------------------------

@guard("conv")
def conv_section() -> None:
    from qnext.ops import causal_conv
    from qnext.ops.triton_conv1d import causal_conv1d_prefill_, causal_conv1d_update_
    torch.manual_seed(0)
    t = 8192
    w = torch.randn(CONV, 4, device="cuda").bfloat16()
    x = torch.randn(t, CONV + 4096, device="cuda").bfloat16()[:, :CONV]      # strided, as out of in_proj
    cache = torch.randn(64, CONV, 3, device="cuda").bfloat16()
    slots = torch.tensor([5], device="cuda")
    init = torch.tensor([True], device="cuda")
    cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    ref_y, ref_s = causal_conv.causal_conv1d(x, w, cache[slots], cu)
    work = cache.clone()
    y = causal_conv1d_prefill_(x, w, work, slots, init, cu)
    parity("conv prefill T=8192 y", rel(y, ref_y), 1e-2)
    parity("conv prefill T=8192 state", rel(work[slots], ref_s), 1e-6)
    us = time_events(lambda i: causal_conv1d_prefill_(x, w, work, slots, init, cu), iters=9)
    record("conv prefill T=8192 C=8192", us, bytes_=2 * t * CONV * 2)
    # the GDN layer's call: channels read through its column map out of in_proj_qkvz's [T, 12288] output
    from qnext.config import ModelConfig
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.weights.presets import preset_config
    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config("qwen3-coder-next")), 0, dtype=torch.bfloat16,
                        device="meta")
    cols = gdn.qkv_columns(torch.device("cuda"))
    xq = torch.randn(t, gdn.in_proj_qkvz.out_features, device="cuda").bfloat16()
    ref_y, _ = causal_conv.causal_conv1d(xq[:, cols.long()], w, cache[slots], cu)
    for run in (1, gdn.qkv_run):
        y = causal_conv1d_prefill_(xq, w, cache.clone(), slots, init, cu, x_cols=cols, x_cols_run=run)
        parity(f"conv prefill T=8192 column map run {run}", rel(y, ref_y), 1e-2)
        us = time_events(lambda i, run=run: causal_conv1d_prefill_(xq, w, work, slots, init, cu, x_cols=cols,
                                                                   x_cols_run=run), iters=9)
        record(f"conv prefill T=8192 C=8192 column map, run {run}", us, bytes_=2 * t * CONV * 2)
    for bt, warps in ((32, 4), (16, 4), (64, 4), (64, 8)):        # the GDN layer's call (q, k, v planes) by tile
        y = causal_conv1d_prefill_(xq, w, cache.clone(), slots, init, cu, x_cols=cols, x_cols_run=gdn.qkv_run,
                                   bt=bt, warps=warps, split=(2048, 2048))
        parity(f"conv prefill q, k, v planes bt {bt} warps {warps}", rel(torch.cat(y, dim=1), ref_y), 1e-2)
        us = time_events(lambda i: causal_conv1d_prefill_(xq, w, work, slots, init, cu, x_cols=cols, bt=bt,
                                                          warps=warps, x_cols_run=gdn.qkv_run, split=(2048, 2048)),
                         iters=9)
        record(f"conv prefill T=8192 C=8192 q, k, v planes, bt {bt} warps {warps}", us, bytes_=2 * t * CONV * 2)
    for n in (1, 32):
        xs = torch.randn(n, CONV, device="cuda").bfloat16()
        sl = torch.randperm(64, device="cuda")[:n]
        ref_y, ref_s = causal_conv.causal_conv1d_update(xs, cache[sl], w)
        work = cache.clone()
        y = causal_conv1d_update_(xs, w, work, sl)
        parity(f"conv update B={n}", max(rel(y, ref_y), rel(work[sl], ref_s)), 1e-2)
        us = time_graph(lambda i: causal_conv1d_update_(xs, w, work, sl), 1)
        record(f"conv update B={n}", us, bytes_=n * CONV * 2 * (1 + 3 + 3 + 1))


# ---- attention -----------------------------------------------------------------------------------------------------

def _paged(ctx_lens, qlens, block_size=64, extra_blocks=8):
    need = sum(-(-(c + n) // block_size) for c, n in zip(ctx_lens, qlens))
    nb = need + extra_blocks
    perm = torch.randperm(nb).tolist()
    tables, used = [], 0
    for c, n in zip(ctx_lens, qlens):
        p = -(-(c + n) // block_size)
        tables.append(perm[used:used + p])
        used += p
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    kc = torch.randn(nb, block_size, HKV, HD, device="cuda").bfloat16()
    vc = torch.randn(nb, block_size, HKV, HD, device="cuda").bfloat16()
    seq_lens = torch.tensor([c + n for c, n in zip(ctx_lens, qlens)], dtype=torch.int32, device="cuda")
    return kc, vc, bt, seq_lens


@guard("attention")
def attn_section(quick: bool) -> None:
    from qnext.ops import paged_attention as ref_mod
    from qnext.ops.triton_paged_attention import paged_decode_attention, paged_prefill_attention
    torch.manual_seed(0)
    scale = HD ** -0.5
    for bsz, ctx in ((1, 1024), (1, 32768), (32, 1024), (8, 32768)):
        kc, vc, bt, seq_lens = _paged([ctx - 1] * bsz, [1] * bsz)
        q = torch.randn(bsz, HQ, HD, device="cuda").bfloat16()
        slot = torch.tensor([bt[i, (ctx - 1) // 64].item() * 64 + (ctx - 1) % 64 for i in range(bsz)], device="cuda")
        kv_new = [kc.view(-1, HKV, HD)[slot].clone(), vc.view(-1, HKV, HD)[slot].clone()]
        ref = ref_mod.paged_attention(q, kv_new[0], kv_new[1], kc.clone(), vc.clone(), slot_mapping=slot,
                                      block_tables=bt, seq_lens=seq_lens, query_lens=[1] * bsz,
                                      context_lens=[ctx - 1] * bsz, scale=scale)
        out = paged_decode_attention(q, kc, vc, bt, seq_lens, scale, ctx)
        parity(f"attn decode B={bsz} ctx={ctx}", rel(out, ref), 1e-2)
        nbytes = bsz * ctx * HKV * HD * 2 * 2
        us = time_graph(lambda i: paged_decode_attention(q, kc, vc, bt, seq_lens, scale, ctx), 1, reps=12)
        record(f"attn decode B={bsz} ctx={ctx}", us, bytes_=nbytes)
        del kc, vc
    # prefill 8K fresh: our paged kernel vs SDPA (flash) on contiguous K/V
    t = 8192
    kc, vc, bt, seq_lens = _paged([0], [t])
    q = torch.randn(t, HQ, HD, device="cuda").bfloat16()
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    k = kc[bt[0].long()].flatten(0, 1)[:t]
    v = vc[bt[0].long()].flatten(0, 1)[:t]
    sub = 1024                                      # parity on the first 1K queries (fresh: causal over 1K keys)
    ref = F.scaled_dot_product_attention(q[:sub].transpose(0, 1)[None].float(), k[:sub].transpose(0, 1)[None].float(),
                                         v[:sub].transpose(0, 1)[None].float(), is_causal=True, scale=scale,
                                         enable_gqa=True)[0].transpose(0, 1)
    out = paged_prefill_attention(q, kc, vc, bt, seq_lens, cu, [t], scale)
    parity("attn prefill paged T=8192 (first 1K rows)", rel(out[:sub], ref), 1e-2)
    from qnext.ops.triton_paged_attention import fresh_prefill_attention
    out = fresh_prefill_attention(q, k, v, [t], scale)
    parity("attn prefill fresh/SDPA T=8192 (first 1K rows)", rel(out[:sub], ref), 1e-2)
    flops = 4 * t * t / 2 * HQ * HD
    us = time_events(lambda i: paged_prefill_attention(q, kc, vc, bt, seq_lens, cu, [t], scale), iters=5)
    record("attn prefill paged triton T=8192", us, flops=flops)
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    try:
        us = time_events(lambda i: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale,
                                                                   enable_gqa=True), iters=5)
        record("attn prefill SDPA enable_gqa T=8192", us, flops=flops)
    except Exception as e:
        RESULTS["errors"]["sdpa gqa"] = repr(e)
    ke, ve = kt.repeat_interleave(HQ // HKV, dim=1), vt.repeat_interleave(HQ // HKV, dim=1)
    us = time_events(lambda i: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale), iters=5)
    record("attn prefill SDPA expanded kv T=8192", us, flops=flops)
    # one chunk of n queries over 6K cached keys: the paged kernel against SDPA on gathered K/V (SDPA_MIN_CHUNK)
    from qnext.ops.triton_paged_attention import cached_chunk_attention
    ctx = 6144
    for n in (16, 32, 64, 128, 512, 2048):
        kc, vc, bt, seq_lens = _paged([ctx], [n])
        q = torch.randn(n, HQ, HD, device="cuda").bfloat16()
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        ref = paged_prefill_attention(q, kc, vc, bt, seq_lens, cu, [n], scale)
        out = cached_chunk_attention(q, kc, vc, bt[0], ctx + n, scale)
        parity(f"attn chunk n={n} ctx={ctx}: SDPA on gathered K/V vs paged kernel", rel(out, ref), 1e-2)
        flops = 4 * n * (ctx + n / 2) * HQ * HD
        us = time_events(lambda i: paged_prefill_attention(q, kc, vc, bt, seq_lens, cu, [n], scale), iters=10)
        record(f"attn chunk n={n} ctx={ctx} paged triton", us, flops=flops)
        us = time_events(lambda i: cached_chunk_attention(q, kc, vc, bt[0], ctx + n, scale), iters=10)
        record(f"attn chunk n={n} ctx={ctx} SDPA gathered", us, flops=flops)


# ---- fp8 linear ----------------------------------------------------------------------------------------------------

@guard("fp8_linear")
def fp8_section(quick: bool) -> None:
    from qnext.ops.triton_linear_fp8 import fp8_linear, small_m_tiles
    torch.manual_seed(0)
    for n, k in ((12288, 2048), (2048, 4096)):
        ws = [quant.quantize_fp8_block(torch.randn(n, k, device="cuda") / k ** 0.5) for _ in range(8)]
        wb = [quant.dequantize(w, torch.bfloat16) for w in ws[:4]]
        for m in (1, 8, 32, 8192):
            x = torch.randn(m, k, device="cuda").bfloat16()
            wf = quant.dequantize(ws[0])
            ref = x.float() @ wf.t()
            blocks = x.float().view(m, -1, 128)                # activations as w8a8 / scaled_mm round them
            sc = (blocks.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
            ref_q = ((blocks / sc).to(torch.float8_e4m3fn).float() * sc).view(m, -1) @ wf.t()
            paths = (["gemv", "scaled_mm", "w8a8", "w8a16"] if m <= 32 else ["w8a8", "w8a16", "scaled_mm", "dequant"])
            if m == 1:
                paths += ["w8a16", "dequant"]
            for path in paths:
                try:
                    out = fp8_linear(x, ws[0], path=path)
                except Exception as e:
                    RESULTS["errors"][f"fp8 {path} {m}x{n}x{k}"] = f"{type(e).__name__}: {e}"[:400]
                    print(f"[error] fp8 {path} M={m}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                parity(f"fp8 linear {path} M={m} N={n} K={k}",
                       rel(out, ref_q if path in ("w8a8", "scaled_mm") else ref), 1e-2)
                if m <= 32:
                    us = time_graph(lambda i, path=path: fp8_linear(x, ws[i % 8], path=path), 8)
                    record(f"fp8 linear {path} M={m} N={n} K={k}", us, bytes_=n * k * 1.0)
                else:
                    us = time_events(lambda i, path=path: fp8_linear(x, ws[i % 8], path=path), 8, iters=5)
                    record(f"fp8 linear {path} M={m} N={n} K={k}", us, flops=2 * m * n * k)
            if 1 < m <= 32:                                     # small-M w8a16 tile variants
                for t in (dict(split=1), dict(split=2), dict(split=4), dict(split=8), dict(bn=32), dict(bn=64),
                          dict(bn=16), dict(num_stages=3), dict(num_warps=2)):
                    tiles = {**small_m_tiles(m, n, k), **t}
                    us = time_graph(lambda i, tiles=tiles: fp8_linear(x, ws[i % 8], path="w8a16", tiles=tiles), 8)
                    record(f"fp8 linear w8a16 M={m} N={n} K={k} {t}", us, bytes_=n * k * 1.0)
            if m <= 32:
                us = time_graph(lambda i: F.linear(x, wb[i % 4]), 4)
                record(f"bf16 cuBLAS linear M={m} N={n} K={k}", us, bytes_=n * k * 2.0)
            else:
                us = time_events(lambda i: F.linear(x, wb[i % 4]), 4, iters=5)
                record(f"bf16 cuBLAS linear M={m} N={n} K={k}", us, flops=2 * m * n * k)
        del ws, wb


def attn_split_sweep() -> None:
    """Paged decode attention at serving shapes (16-token pages; 32 sequences at 4K-9K context, one at 1K / 9K):
    the split count (decode_splits' choice, then 2-8x more programs), BN, warps and stages, parity for each."""
    from qnext.ops import paged_attention as ref_mod
    from qnext.ops.triton_paged_attention import decode_splits, paged_decode_attention
    torch.manual_seed(0)
    scale = HD ** -0.5
    for bsz, ctx in ((32, 9216), (32, 4096), (1, 9216), (1, 1024)):
        bs = 16                                     # the engine's page size
        kc, vc, bt, seq_lens = _paged([ctx - 1] * bsz, [1] * bsz, block_size=bs)
        q = torch.randn(bsz, HQ, HD, device="cuda").bfloat16()
        slot = torch.tensor([bt[i, (ctx - 1) // bs].item() * bs + (ctx - 1) % bs for i in range(bsz)], device="cuda")
        kv_new = [kc.view(-1, HKV, HD)[slot].clone(), vc.view(-1, HKV, HD)[slot].clone()]
        ref = ref_mod.paged_attention(q, kv_new[0], kv_new[1], kc.clone(), vc.clone(), slot_mapping=slot,
                                      block_tables=bt, seq_lens=seq_lens, query_lens=[1] * bsz,
                                      context_lens=[ctx - 1] * bsz, scale=scale)
        auto = decode_splits(bsz, HKV, ctx, q.device)
        nbytes = bsz * ctx * HKV * HD * 2 * 2
        for ns, bn, warps, stages in ((auto, 64, 4, 2), (2 * auto, 64, 4, 2), (4 * auto, 64, 4, 2),
                                      (8 * auto, 64, 4, 2), (auto, 64, 8, 2), (auto, 64, 4, 3), (auto, 32, 4, 2),
                                      (4 * auto, 32, 4, 2), (4 * auto, 64, 4, 3), (4 * auto, 64, 8, 3)):
            ns = min(ns, 256)
            fn = lambda i, ns=ns, bn=bn, w=warps, st=stages: paged_decode_attention(
                q, kc, vc, bt, seq_lens, scale, ctx, num_splits=ns, bn=bn, num_warps=w, num_stages=st)
            name = f"attn decode B={bsz} ctx={ctx} splits{ns} bn{bn} w{warps} st{stages}"
            parity(name, rel(fn(0), ref), 1e-2)
            record(name, time_graph(fn, 1, reps=12), bytes_=nbytes)
        del kc, vc


def fp8_gemv_sweep() -> None:
    """Tile sweep of the batch-1 fp8 GEMV over the model's dense shapes (qkvz, out_proj, q_proj, shared expert
    gate/up and down): which (BN rows, NG scale groups per step) is fastest for each; then the same kernel on the
    plain bf16 weights (bf16_gemv) against cuBLAS."""
    from qnext.ops.triton_linear_fp8 import bf16_gemv, fp8_gemv
    torch.manual_seed(0)
    from qnext.ops import triton_linear_fp8
    # (BN, NG, warps); split-K (more programs, fewer dependent steps each) lost at every shape (ninth session)
    wide = [(16, 2, 4), (16, 4, 4), (16, 8, 4), (16, 16, 4), (16, 8, 8), (32, 4, 4), (32, 8, 8), (8, 16, 4),
            (64, 4, 8)]
    narrow = [(4, 16, 4), (2, 16, 4), (8, 16, 4), (4, 32, 4), (8, 8, 4), (16, 8, 4), (2, 32, 2), (4, 16, 2)]
    for n, k in ((12288, 2048), (2048, 4096), (9216, 2048), (512, 2048), (2048, 512), (1024, 2048)):
        ws = [quant.quantize_fp8_block(torch.randn(n, k, device="cuda") / k ** 0.5) for _ in range(8)]
        x = torch.randn(1, k, device="cuda").bfloat16()
        ref = x.float() @ quant.dequantize(ws[0]).t()
        for step_sum in (False, True):       # the [BN, NG, 128] accumulator (before 2026-12-03) at its tiles
            triton_linear_fp8.GEMV_STEP_SUM = step_sum
            for bn, ng, warps in ((wide if n > 2048 else narrow) if step_sum else
                                  [triton_linear_fp8.gemv_tiles(n, k)]):
                if ng * 128 > k:
                    continue
                name = f"fp8 gemv M=1 N={n} K={k} bn{bn} ng{ng} w{warps}" + ("" if step_sum else " old-acc")
                fn = lambda i, bn=bn, ng=ng, warps=warps: fp8_gemv(x, ws[i % 8], bn=bn, ng=ng, num_warps=warps)
                parity(name, rel(fn(0), ref), 1e-2)
                record(name, time_graph(fn, 8), bytes_=n * k * 1.0)
        del ws
    # router + shared-expert gate, in_proj_ba (lm_head stays on cuBLAS: 100% of the copy rate, run 1)
    for n, k in ((513, 2048), (64, 2048)):
        ws = [torch.randn(n, k, device="cuda").bfloat16() / k ** 0.5 for _ in range(8)]
        x = torch.randn(1, k, device="cuda").bfloat16()
        parity(f"bf16 gemv N={n} K={k}", rel(bf16_gemv(x, ws[0]), x.float() @ ws[0].float().t()), 1e-2)
        us = time_graph(lambda i: F.linear(x, ws[i % 8]), 8)
        record(f"bf16 cuBLAS M=1 N={n} K={k}", us, bytes_=n * k * 2.0)
        for bn, ng in ((1, 16), (2, 16), (4, 8), (4, 16), (8, 4)):
            us = time_graph(lambda i, bn=bn, ng=ng: bf16_gemv(x, ws[i % 8], bn=bn, ng=ng), 8)
            record(f"bf16 gemv M=1 N={n} K={k} bn{bn} ng{ng}", us, bytes_=n * k * 2.0)
        del ws


@guard("fused")
def fused_projection_sweep() -> None:
    """Batch-1 chains of dependent launches in one CUDA graph (PDL as in the model), fused against separate: SwiGLU
    -> shared-expert down GEMV (2048 x 512) as two kernels or formed in the GEMV (tiles); in_proj_qkvz (fp8 12288)
    then in_proj_ba (bf16 64), and shared gate_up (fp8 1024) then the router stack (bf16 528), as two GEMVs or one
    pair launch. Parity of each fused form against the separate kernels (bit for bit)."""
    from qnext.ops.triton_ffn import silu_mul
    from qnext.ops.triton_linear_fp8 import bf16_gemv, fp8_gemv, gemv, gemv_pair
    torch.manual_seed(0)
    gu = torch.randn(1, 2 * I, device="cuda").bfloat16()
    w_down = [quant.quantize_fp8_block(torch.randn(H, I, device="cuda") / I ** 0.5) for _ in range(8)]
    ref = fp8_gemv(silu_mul(gu[:, :I], gu[:, I:]), w_down[0])
    record("silu_mul+down separate", time_graph(lambda i: fp8_gemv(silu_mul(gu[:, :I], gu[:, I:]), w_down[i % 8]), 8))
    for bn in (4, 8, 16):
        fn = lambda i, bn=bn: fp8_gemv(gu[:, :I], w_down[i % 8], bn=bn, up=gu[:, I:])  # noqa: E731
        parity(f"down, SwiGLU in the GEMV bn{bn}", float(not torch.equal(fn(0), ref)), 0.5)
        record(f"down, SwiGLU in the GEMV bn{bn}", time_graph(fn, 8))
    x = torch.randn(1, H, device="cuda").bfloat16()
    for name, n1, n2 in (("qkvz+ba", 12288, 64), ("shared gate_up+router", 2 * I, 528)):
        w1 = [quant.quantize_fp8_block(torch.randn(n1, H, device="cuda") / H ** 0.5) for _ in range(4)]
        w2 = [torch.randn(n2, H, device="cuda").bfloat16() / H ** 0.5 for _ in range(4)]
        r1, r2 = fp8_gemv(x, w1[0]), bf16_gemv(x, w2[0])
        y1, y2 = gemv_pair(x, w1[0], w2[0])
        parity(f"{name} pair", float(not (torch.equal(y1, r1) and torch.equal(y2, r2))), 0.5)
        record(f"{name} separate", time_graph(lambda i: (fp8_gemv(x, w1[i % 4]), gemv(x, w2[i % 4])), 4),
               bytes_=n1 * H + 2 * n2 * H)
        record(f"{name} pair", time_graph(lambda i: gemv_pair(x, w1[i % 4], w2[i % 4]), 4),
               bytes_=n1 * H + 2 * n2 * H)
        del w1, w2


def fp8_small_m_sweep() -> None:
    """Decode-batch FP8 projections (w8a16 tl.dot, small_m_tiles) over the model's dense shapes at 8 and 32 rows:
    split-K factors against the default, and the other operand order (small_m_tiles' swap) with two split
    factors and 128-row tiles, with parity for each."""
    from qnext.ops.triton_linear_fp8 import fp8_linear, small_m_tiles
    torch.manual_seed(0)
    for n, k in ((12288, 2048), (9216, 2048), (2048, 4096), (1024, 2048), (2048, 512)):
        ws = [quant.quantize_fp8_block(torch.randn(n, k, device="cuda") / k ** 0.5) for _ in range(8)]
        for m in (8, 32):
            x = torch.randn(m, k, device="cuda").bfloat16()
            ref = x.float() @ quant.dequantize(ws[0]).t()
            base = small_m_tiles(m, n, k)
            swapped = small_m_tiles(m, n, k, swap=not base["swap"])
            for t in (None, dict(split=1), dict(split=2), dict(split=4), dict(split=8), swapped,
                      dict(swapped, split=max(1, swapped["split"] // 2)), dict(swapped, bn=128)):
                tiles = {**base, **(t or {})}
                tag = (f"default (split {base['split']})" if t is None else
                       f"swap={tiles['swap']} bn {tiles['bn']} split {tiles['split']}" if "swap" in t else
                       f"split {t['split']}")
                parity(f"fp8 w8a16 M={m} N={n} K={k} {tag}", rel(fp8_linear(x, ws[0], path="w8a16", tiles=tiles),
                                                                  ref), 1e-2)
                us = time_graph(lambda i, tiles=tiles: fp8_linear(x, ws[i % 8], path="w8a16", tiles=tiles), 8)
                record(f"fp8 w8a16 M={m} N={n} K={k} {tag}", us, bytes_=n * k * 1.0)
        del ws


def fp8_prefill_sweep() -> None:
    """Prefill-sized FP8 projections over the model's dense shapes (in_proj_qkvz, stacked q/k/v, out_proj and
    o_proj, shared expert gate+up and down): scaled_mm against dequant + cuBLAS by row count, with bf16 cuBLAS
    on resident bf16 weights beside them (which LARGE_M_PATH should be)."""
    from qnext.ops.triton_linear_fp8 import fp8_linear
    torch.manual_seed(0)
    for n, k in ((12288, 2048), (9216, 2048), (2048, 4096), (1024, 2048), (2048, 512)):
        ws = [quant.quantize_fp8_block(torch.randn(n, k, device="cuda") / k ** 0.5) for _ in range(4)]
        wb = [quant.dequantize(w, torch.bfloat16) for w in ws]
        for m in (256, 512, 1024, 2048, 8192):
            x = torch.randn(m, k, device="cuda").bfloat16()
            wf = quant.dequantize(ws[0])
            blocks = x.float().view(m, -1, 128)                # activations as scaled_mm rounds them
            sc = (blocks.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
            refs = {"dequant": x.float() @ wf.t(),
                    "scaled_mm": ((blocks / sc).to(torch.float8_e4m3fn).float() * sc).view(m, -1) @ wf.t()}
            for path in ("scaled_mm", "dequant"):
                parity(f"fp8 prefill {path} M={m} N={n} K={k}", rel(fp8_linear(x, ws[0], path=path), refs[path]),
                       1e-2)
                us = time_events(lambda i, path=path: fp8_linear(x, ws[i % 4], path=path), 4, iters=7)
                record(f"fp8 prefill {path} M={m} N={n} K={k}", us, flops=2 * m * n * k)
            us = time_events(lambda i: F.linear(x, wb[i % 4]), 4, iters=7)
            record(f"bf16 cuBLAS M={m} N={n} K={k}", us, flops=2 * m * n * k)
        del ws, wb


@guard("grouped")
def grouped_sweep(kinds) -> None:
    """The grouped (decode-batch) MoE at 8-64 tokens: tiles and stages around the defaults, with an older
    version of the kernels as the baseline when scripts/old_grouped_ref.py is there (a copy made for the run, e.g.
    `git show bcd567e:qnext/ops/triton_moe_grouped.py > scripts/old_grouped_ref.py`); parity of each against the
    float32 reference; then the kernels of one call by name (torch profiler) for the baseline, the default and
    the best."""
    from torch.profiler import ProfilerActivity, profile

    from qnext.ops.triton_moe import fused_moe, kernel_view
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import old_grouped_ref
    except ImportError:
        old_grouped_ref = None
    variants = {
        "default": {}, "bn32": dict(bn=32), "bn128": dict(bn=128), "bn2 64": dict(bn2=64), "bn2 256": dict(bn2=256),
        "stages 3": dict(stages=3, stages2=3), "stages 5": dict(stages=5, stages2=5),
        "warps 2": dict(warps=2, warps2=2),
    }
    for kind in kinds:
        layers = [make_layer(kind, s) for s in (1, 2)]
        per_expert = expert_bytes(*layers[0])
        best: dict[int, tuple[float, str]] = {}
        for m in (32, 8, 16, 64):
            routes = routings(m, 8, seed=m)
            xs = [torch.randn(m, H, device="cuda").bfloat16() for _ in range(4)]
            uniq = statistics.mean(int(torch.unique(r[1]).numel()) for r in routes)
            w, ids = routes[0]
            ref = quant.moe_forward_ref(xs[0], *layers[0], w, ids, h_dtype=torch.bfloat16)
            calls = {}                  # variant -> fn(x, layer, weights, ids)
            if old_grouped_ref is not None:
                calls["baseline"] = lambda x, l, wt, ids_: old_grouped_ref.moe_grouped(
                    x, kernel_view(l[0]), kernel_view(l[1]), wt, ids_)
            for name, cfg in variants.items():
                calls[name] = lambda x, l, wt, ids_, cfg=cfg: fused_moe(x, *l, wt, ids_, path="grouped", config=cfg)
            for name, fn in calls.items():
                if left() < 25:
                    break
                try:
                    parity(f"grouped {kind} M={m} {name}", rel(fn(xs[0], layers[0], w, ids), ref), 1.5e-2)
                    us = time_graph(lambda i, fn=fn: fn(xs[i % 4], layers[i % 2], *routes[i % 8]), 16)
                except Exception as e:
                    RESULTS["errors"][f"grouped {kind} M={m} {name}"] = repr(e)[:400]
                    print(f"[error] grouped {kind} M={m} {name}: {e!r}"[:600], flush=True)
                    continue
                record(f"grouped {kind} M={m} {name}", us, bytes_=uniq * per_expert,
                       note=f"{uniq:.0f} experts x {per_expert / 2**20:.2f} MiB")
                if name != "baseline" and us < best.get(m, (1e9, ""))[0]:
                    best[m] = (us, name)
            if m == 32 and left() > 40:       # kernels by name: the baseline, the default, the best
                for name in dict.fromkeys(["baseline", "default", best.get(32, (0, "default"))[1]]):
                    if name not in calls:
                        continue
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for i in range(16):
                            calls[name](xs[i % 4], layers[i % 2], *routes[i % 8])
                        torch.cuda.synchronize()
                    rows = sorted(((e.key, e.device_time_total / 16, e.count / 16) for e in prof.key_averages()
                                   if e.device_time_total > 0), key=lambda r: -r[1])
                    RESULTS["timing"][f"grouped {kind} M=32 {name} kernels"] = rows[:8]
                    print(f"[kernels] {name}: " + "; ".join(f"{k[:40]} {us:.1f} us x{c:.0f}" for k, us, c in rows[:8]),
                          flush=True)
        print(f"[best] {kind}: {best}", flush=True)
        del layers
        torch.cuda.empty_cache()


def write_results(out: str, stem: str = "gpu_check") -> None:
    """RESULTS as <stem>.json and the table as <stem>.md under out; the table printed."""
    RESULTS["elapsed_s"] = time.time() - T0
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    lines = [f"device: {RESULTS['env'].get('device')} | {RESULTS['env'].get('nvidia_smi')}",
             f"copy {RESULTS['env'].get('copy_GBps', 0):.0f} GB/s, bf16 mm {RESULTS['env'].get('matmul_TFLOPs', 0):.0f}"
             f" TFLOP/s; torch {RESULTS['env'].get('torch')} triton {RESULTS['env'].get('triton')}", "",
             "| op | us | rate | note |", "|---|---:|---|---|"]
    lines += [f"| {n} | {us:.1f} | {extra.strip()} | {note} |" for n, us, extra, note in ROWS]
    bad = [k for k, v in RESULTS["parity"].items() if not v["ok"]]
    lines += ["", f"parity: {len(RESULTS['parity']) - len(bad)} ok, {len(bad)} failed {bad}",
              f"errors: {RESULTS['errors']}"]
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    global BUDGET, DECODE_ONLY
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--only", default="moe,gdn,conv,attn,fp8")
    ap.add_argument("--kinds", default="int4_128,bf16,fp8,int4_32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="MoE: skip the prefill timings")
    args = ap.parse_args()
    BUDGET = args.budget
    DECODE_ONLY = args.decode_only
    os.makedirs(args.out, exist_ok=True)
    env()
    only = set(args.only.split(","))
    kinds = args.kinds.split(",")
    try:                                       # most important first: the budget guard skips what is left
        if "moe" in only:
            moe_section([k for k in kinds if k != "int4_32"], args.quick)
        if "gdn" in only:
            gdn_section(args.quick)
        if "attn" in only:
            attn_section(args.quick)
        if "grouped" in only:
            grouped_sweep([k for k in kinds if k != "int4_32"])
        if "fp8gemv" in only:
            fp8_gemv_sweep()
        if "attnsplit" in only:
            attn_split_sweep()
        if "fused" in only:
            fused_projection_sweep()
        if "fp8small" in only:
            fp8_small_m_sweep()
        if "fp8prefill" in only:
            fp8_prefill_sweep()
        if "fp8" in only:
            fp8_section(args.quick)
        if "conv" in only:
            conv_section()
        if "moe" in only and "int4_32" in kinds:
            moe_section(["int4_32"], True)
    finally:
        write_results(args.out)


if __name__ == "__main__":
    main()
