#!/usr/bin/env python3
"""End to end on the GPU: the whole model through the fast paths, parity first, then `bench latency` figures.

    python3 scripts/gpu_e2e.py --out $OUT --budget 240

(a) parity: the narrow preset (full-size heads, hidden 256, 4 layers, 16 experts; random weights) runs greedy on the
    device in bf16, eager and with decode CUDA graphs, and is checked against the CPU float32 reference path with
    the same weights: prefill logits (relative error) and teacher-forced greedy ids (each device-chosen token must
    be within a tolerance of the reference's best logit at that position; exact matches are reported too).
    Done for plain bf16 and for int4 experts + FP8 dense.
(b) speed: full-size synthetic qwen3-coder-next (int4 experts + FP8 dense made on the GPU, router uniform) in the
    engine, measured like `qnext bench latency`: decode-b1 at 1K context (256 tokens), decode b8 / b32 at 1K,
    prefill 8K (time to first token); CUDA-graph replay time per decode step (the device's share of a step); the
    kernels of one replayed b1 step (torch profiler: launches, device time, the top kernels); eager decode for
    comparison; where a b32 step's host time goes (cProfile over engine steps); the kernels of one 8K prefill;
    an A/B of the side stream (the same model, decode graphs without branches) and of the FP8 prefill path
    (scaled_mm instead of dequant + cuBLAS); then the other --variants (fp8 experts, bf16 dense) if time is left.
    --extras picks the first variant's extended measurements (knobs, early, conv, outnorm, ab, host, trace, mixed,
    lone, wave, eager; outnorm: the GDN output norm in out_proj or apart, see out_norm_ab; knobs: the same model
    with the decode projections unfused, with the GEMV's previous accumulator, on one stream, without programmatic
    dependent launch: see knobs_ab; early: the batch-1 chain's shorter links each
    off: see early_ab; conv: the GDN decode conv apart from the in_proj GEMV: see conv_ab).
Every step is guarded (an error is recorded, the rest goes on), skipped when the budget is short, and the JSON under
--out is rewritten after each. Off the GPU (--device cpu --preset small) it runs the same logic on the references.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qnext.bench.latency import _decode_once, _prefill_once  # noqa: E402
from qnext.cache.model_cache import ModelCache  # noqa: E402
from qnext.config import EngineConfig, ModelConfig  # noqa: E402
from qnext.engine.forward_batch import ForwardBatch  # noqa: E402
from qnext.engine.llm_engine import LLMEngine  # noqa: E402
from qnext.model.layers.linear import QuantScheme  # noqa: E402
from qnext.model.qwen3_next import Qwen3NextForCausalLM  # noqa: E402
from qnext.sampling_params import SamplingParams  # noqa: E402
from qnext.weights.presets import preset_config  # noqa: E402
from qnext.weights.synthetic import fill_synthetic_  # noqa: E402

T0 = time.time()
BUDGET = 240.0
OUT = "out"
R: dict = {"env": {}, "parity": {}, "bench": {}, "errors": {}, "log": []}


def log(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    R["log"].append(line)
    print(line, flush=True)


def left() -> float:
    return BUDGET - (time.time() - T0)


def save() -> None:
    R["elapsed_s"] = time.time() - T0
    with open(os.path.join(OUT, "gpu_e2e.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)


def guarded(name: str, need_s: float, fn, *a, **kw):
    """fn(*a, **kw) unless less than need_s seconds are left; an exception is recorded, not raised."""
    if left() < need_s:
        R["errors"][name] = f"skipped: {left():.0f}s left, needs ~{need_s:.0f}s"
        log(f"[skip] {name}: {R['errors'][name]}")
        save()
        return None
    t = time.time()
    log(f"[start] {name}")
    try:
        return fn(*a, **kw)
    except Exception as e:  # keep going: one failure must not lose the other figures
        R["errors"][name] = f"{type(e).__name__}: {e}"
        log(f"[error] {name}: {type(e).__name__}: {e}")
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        log(f"[done] {name} in {time.time() - t:.1f}s, {left():.0f}s left")
        save()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def env(device: str) -> None:
    e = R["env"]
    e["torch"], e["date"] = torch.__version__, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if device == "cuda":
        e["device"] = torch.cuda.get_device_name()
        try:
            e["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as ex:
            e["nvidia_smi"] = repr(ex)
        import triton
        e["triton"] = triton.__version__
        try:
            import fla
            e["fla"] = getattr(fla, "__version__", "?")
        except Exception as ex:
            e["fla"] = repr(ex)
        from qnext.ops.pdl import pdl_enabled
        e["pdl"] = pdl_enabled()
    log(f"[env] {e}")


# ---- (a) parity ------------------------------------------------------------------------------------------------------

def same_ids(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many greedy ids of two runs over the same prompts agree, position by position."""
    return {"same": sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)), "total": sum(map(len, a))}


def generate(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return [out[f"g{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def prompt_logits(model, prompts: list[list[int]], device) -> torch.Tensor:
    """Last-position logits [B, V] float32 of fresh prompts, own cache."""
    cfg = model.config
    batch = ForwardBatch.for_prompts(prompts, 16, device)
    pages = batch.block_tables.numel()
    cache = ModelCache(cfg, num_blocks=pages, block_size=16, num_slots=len(prompts), dtype=model.dtype,
                       device=device)
    hidden = model(batch, cache)
    return model.compute_logits(hidden[batch.logits_indices]).float().cpu()


@torch.inference_mode()
def all_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] at every position of one sequence (reference, CPU)."""
    batch = ForwardBatch.for_prompts([ids], 16, "cpu")
    cache = ModelCache(model.config, num_blocks=batch.block_tables.numel(), block_size=16, num_slots=1,
                       dtype=model.dtype, device="cpu")
    return model.compute_logits(model(batch, cache)).float()


def teacher_forced(ref, prompts, outs, tol_sigma: float) -> dict:
    """Each generated token vs the reference's logits at its position: ok when within tol_sigma row-stds of the
    best one (near ties may go either way in bf16)."""
    ok = total = worst = 0
    for p, gen in zip(prompts, outs):
        lg = all_logits(ref, p + gen[:-1])[len(p) - 1:]                        # [n, V]
        for j, tok in enumerate(gen):
            row = lg[j]
            gap = float((row.max() - row[tok]) / row.std())
            worst = max(worst, gap)
            ok += gap <= tol_sigma
            total += 1
    return {"ok": ok, "total": total, "worst_gap_sigma": worst, "pass": ok == total}


def parity_case(scheme_name: str | None, device: str, tol_logits: float, tol_sigma: float) -> None:
    cfg = ModelConfig.from_hf(preset_config("narrow"))
    scheme = QuantScheme.named(scheme_name, cfg)
    ref = fill_synthetic_(Qwen3NextForCausalLM(cfg, dtype=torch.float32, device="cpu", quantization=scheme,
                                               ops_backend="torch").eval(), seed=3)
    dev = Qwen3NextForCausalLM(cfg, dtype=torch.bfloat16, device=device, quantization=scheme).eval()
    dev.load_state_dict(ref.state_dict())                                       # same weights, cast to bf16
    rng = random.Random(1)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in (5, 17, 40)]
    key = f"narrow {scheme_name or 'bf16'}"
    err = ((prompt_logits(dev, prompts, device) - prompt_logits(ref, prompts, "cpu")).norm()
           / prompt_logits(ref, prompts, "cpu").norm()).item()
    R["parity"][f"{key} prefill logits"] = {"rel_err": err, "tol": tol_logits, "pass": err < tol_logits}
    log(f"[parity] {key} prefill logits rel err {err:.2e} (tol {tol_logits:.0e})")
    ref_engine = LLMEngine(ref, cfg, EngineConfig(device="cpu", num_kv_blocks=64, max_num_seqs=4))
    ref_out = generate(ref_engine, prompts, 8)
    for eager in (True, False):
        ec = EngineConfig(device=device, num_kv_blocks=64, max_num_seqs=4, enforce_eager=eager, no_warmup=True)
        outs = generate(LLMEngine(dev, cfg, ec), prompts, 8)
        tf = teacher_forced(ref, prompts, outs, tol_sigma)
        exact = sum(a == b for o, r in zip(outs, ref_out) for a, b in zip(o, r))
        name = f"{key} greedy {'eager' if eager else 'graphs'}"
        R["parity"][name] = {**tf, "exact_vs_cpu": f"{exact}/{sum(map(len, ref_out))}", "ids": outs,
                             "cpu_ids": ref_out}
        log(f"[parity] {name}: teacher-forced {tf['ok']}/{tf['total']} within {tol_sigma} sigma "
            f"(worst {tf['worst_gap_sigma']:.3f}), exact vs cpu {exact}/{sum(map(len, ref_out))}")


# ---- (b) speed -------------------------------------------------------------------------------------------------------

def build_full(preset: str, scheme_name: str, device: str, num_experts: int = 0):
    """num_experts (> 0): the preset with fewer routed experts, the same top-k, so the same bytes per token (FP8
    experts of the full preset need an H200; with 256 they fit an H100, for per-layer measurements)."""
    hf = preset_config(preset)
    if num_experts:
        hf["num_experts"] = num_experts
    cfg = ModelConfig.from_hf(hf)
    scheme = QuantScheme.named(scheme_name, cfg)
    t = time.time()
    model = Qwen3NextForCausalLM(cfg, dtype=torch.bfloat16, device=device, quantization=scheme).eval()
    fill_synthetic_(model, seed=0)
    sync(device)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"[build] {preset} ({cfg.num_experts} experts) {scheme}: {nbytes / 2**30:.1f} GiB of weights in "
        f"{time.time() - t:.1f}s")
    return cfg, model, nbytes


def engine_for(model, cfg, device: str, eager: bool, max_model_len: int, kv_cache_memory_gb: float = 8.0,
               **kw) -> LLMEngine:
    """no_warmup: every measurement here runs its own warm-up first; the engine's start-up requests would only add
    compile time (on a cold Triton cache they made a whole variant miss its budget)."""
    t = time.time()
    ec = EngineConfig(device=device, max_num_seqs=32, max_model_len=max_model_len, max_num_batched_tokens=8192,
                      kv_cache_memory_gb=kv_cache_memory_gb if device == "cuda" else 1.0, enforce_eager=eager,
                      no_warmup=True, **kw)
    engine = LLMEngine(model, cfg, ec)
    log(f"[engine] eager={eager} {kw} ready in {time.time() - t:.1f}s (graph capture included)")
    return engine


def rand_prompts(rng: random.Random, b: int, n: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for _ in range(b)]


def record(tag: str, name: str, value: dict) -> None:
    R["bench"].setdefault(tag, {})[name] = value
    log(f"[bench] {tag} {name}: {value}")


def bench_decode(tag: str, engine: LLMEngine, b: int, depth: int, gen: int, repeats: int) -> None:
    rng, vocab = random.Random(b), engine.model_config.vocab_size
    _decode_once(engine, rand_prompts(rng, b, depth, vocab), min(gen, 8))         # warm-up (compiles)
    times = []
    for _ in range(repeats):
        times.append(_decode_once(engine, rand_prompts(rng, b, depth, vocab), gen))
        if left() < 30:
            break
    t = statistics.median(times)
    record(tag, f"decode b{b} @ {depth} ({gen} tokens)",
           {"tokens_per_s": b * (gen - 1) / t, "ms_per_step": 1e3 * t / (gen - 1), "seconds": times})


def bench_steady(tag: str, engine: LLMEngine, b: int, depth: int, steps: int = 48) -> None:
    """Decode steps with all b requests live at ~depth context: bench_decode's window at a deep context is not
    (the first of b long prompts start decoding while the last ones prefill, so its requests finish one by one
    inside the window); here `steps` engine steps are timed once every request decodes, then all are aborted."""
    start_decoding(engine, "steady", b, steps, seed=b + depth, depth=depth)
    sync(engine.device)
    live = len(engine.scheduler.running)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    t = time.perf_counter() - t0
    engine.abort_all()
    record(tag, f"steady decode b{b} @ {depth} ({steps} steps)",
           {"tokens_per_s": live * steps / t, "ms_per_step": 1e3 * t / steps, "live": live})


def bench_prefill(tag: str, engine: LLMEngine, n: int, repeats: int) -> None:
    rng, vocab = random.Random(n), engine.model_config.vocab_size
    _prefill_once(engine, rand_prompts(rng, 1, n, vocab)[0])                     # warm-up (compiles)
    times = []
    for _ in range(repeats):
        times.append(_prefill_once(engine, rand_prompts(rng, 1, n, vocab)[0]))
        if left() < 30:
            break
    t = statistics.median(times)
    record(tag, f"prefill {n}", {"tokens_per_s": n / t, "ttft_ms": 1e3 * t, "seconds": times})


def bench_replay(tag: str, engine: LLMEngine, reps: int = 20) -> None:
    """Device time of one captured decode step per bucket (what a step costs without the host's share)."""
    graphs = engine.runner.decode_forward
    if graphs is None:
        return
    out = {}
    for b in (1, 2, 4, 8, 16, 32):
        if b not in graphs.graphs:
            continue
        g = graphs.graphs[b][0]
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out[f"b{b}"] = start.elapsed_time(end) / reps
    record(tag, "graph replay ms per decode step", out)


def profile_step(tag: str, engine: LLMEngine, top: int = 24) -> None:
    """Kernels of one captured decode step at batch 1 (torch profiler, CUDA activity): how many launches a step
    is, and where its device time goes."""
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.runner.decode_forward
    if graphs is None or 1 not in graphs.graphs:
        return
    g = graphs.graphs[1][0]
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.count, getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))
            for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    rows.sort(key=lambda r: -r[2])
    from torch.autograd import DeviceType
    seq = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    record(tag, "decode b1 step kernels", {
        "launches": sum(r[1] for r in rows), "device_ms": round(sum(r[2] for r in rows) / 1e3, 3),
        "top": [[k[:70], n, round(us, 1)] for k, n, us in rows[:top]],
        # the first layers in launch order: [name, us, gap to the previous kernel's end in us]
        "first kernels [name, us, gap]": [[n[:40], round(z - a, 1), round(a - seq[i - 1][1], 1) if i else 0.0]
                                          for i, (a, z, n) in enumerate(seq[:60])]})


def start_decoding(engine: LLMEngine, name: str, b: int, steps: int, seed: int, depth: int = 256) -> None:
    """b greedy requests of `depth` random prompt tokens, stepped until all of them decode, with room for `steps`
    more steps (the caller aborts them afterwards). The first requests decode while the later prompts prefill
    (one 8K prompt takes about two steps of an 8K budget), so each may produce up to ~2 b tokens before that."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8 + 2 * b * max(1, depth // 4096), ignore_eos=True)
    for i, p in enumerate(rand_prompts(random.Random(seed), b, depth, engine.model_config.vocab_size)):
        engine.add_request(f"{name}-{i}", p, params)
    while engine.scheduler.waiting:
        engine.step()
    engine.step()


def profile_host(tag: str, engine: LLMEngine, b: int = 32, steps: int = 24, top: int = 16) -> None:
    """Where a decode step's host time goes at batch b: cProfile over whole engine steps once all b requests
    decode (the step minus the graph replay is the host's share; the profiler itself inflates Python time)."""
    import cProfile
    import pstats

    start_decoding(engine, "host-profile", b, steps, seed=5)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    engine.abort_all()
    stats = pstats.Stats(prof).stats
    record(tag, f"host profile b{b}", {
        "ms_per_step_profiled": round(1e3 * wall, 3),
        "top_cumulative [name, cumulative ms, self ms]": cprofile_table(stats, 3, steps, top),
        "top_self [name, cumulative ms, self ms]": cprofile_table(stats, 2, steps, top)})


def cprofile_table(stats: dict, key: int, steps: int, top: int) -> list:
    """pstats' raw stats ((file, line, function): (calls, ncalls, self s, cumulative s, callers)) -> the `top`
    functions by field `key` (2 self, 3 cumulative) as [name, cumulative ms, self ms] per step."""
    rows = sorted(stats.items(), key=lambda kv: -kv[1][key])[:top]
    return [[f"{os.path.basename(f)}:{line}({fn})", round(1e3 * ct / steps, 3), round(1e3 * tt / steps, 3)]
            for (f, line, fn), (_, _, tt, ct, _) in rows]


def trace_steps(tag: str, engine: LLMEngine, b: int = 32, steps: int = 8, top: int = 12, depth: int = 256) -> None:
    """Where the device time goes during whole decode steps at batch b and ~depth context (overlap on): torch
    profiler over `steps` engine steps; device busy time (union of kernel and copy intervals) against the span,
    the longest idle gaps with the device activity before and after each, and device time per kernel name. The
    Chrome trace goes to OUT/trace_b{b}_d{depth}.json.gz."""
    import gzip
    import shutil

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    start_decoding(engine, "trace", b, steps, seed=6, depth=depth)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    engine.abort_all()
    dev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start))
    busy, gaps, end, last = 0.0, [], None, ""
    for a, z, name in dev:
        if end is None or a > end:
            if end is not None:
                gaps.append((a - end, last[:60], name[:60]))
            busy += z - a
            end, last = z, name
        else:
            busy += max(0.0, z - end)
            if z > end:
                end, last = z, name
    span = dev[-1][1] - dev[0][0] if dev else 0.0
    gaps.sort(reverse=True)
    per_name: dict[str, list[float]] = {}
    for a, z, name in dev:
        acc = per_name.setdefault(name[:70], [0, 0.0])
        acc[0] += 1
        acc[1] += z - a
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1][1])
    record(tag, f"device trace b{b} @ {depth} ({steps} steps)", {
        "span_ms_per_step": round(span / steps / 1e3, 3), "busy_ms_per_step": round(busy / steps / 1e3, 3),
        "idle_ms_per_step": round((span - busy) / steps / 1e3, 3), "device_events": len(dev),
        "longest_gaps [us, before, after]": [[round(g, 1), x, y] for g, x, y in gaps[:top]],
        "kernels [name, launches per step, ms per step]": [[k, n // steps, round(us / steps / 1e3, 3)]
                                                           for k, (n, us) in kernels[:3 * top]]})
    raw = os.path.join(OUT, f"trace_b{b}_d{depth}.json")
    prof.export_chrome_trace(raw)
    with open(raw, "rb") as f, gzip.open(raw + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    os.remove(raw)


def mixed_prefill(tag: str, engine: LLMEngine, budgets=(8192, 8224, 4096, 2048), decoders: int = 31,
                  depth: int = 1024, prompt: int = 8192, window: int = 24, rounds: int = 2) -> None:
    """What a new prompt costs the running decodes, by step token budget (serve-8k1k-c32's situation): `decoders`
    greedy requests decode at `depth` context; one `prompt`-token request (max_tokens 1) arrives and the engine runs
    `window` steps (each gives every decoder a token; the prompt's chunks ride along in the first ones). The
    window's wall time is what the budget costs for window x decoders tokens plus one prefill: lower is better.
    With decoders = 0 it is the prompt's TTFT. Budgets alternate over `rounds` after an untimed warm-up round
    (chunk shapes compile)."""
    vocab, rng = engine.model_config.vocab_size, random.Random(17)
    sched = engine.scheduler
    keep = sched.max_num_batched_tokens
    params = SamplingParams(temperature=0.0, max_tokens=window * (len(budgets) * (rounds + 1) + 2) + 16,
                            ignore_eos=True)
    for i, p in enumerate(rand_prompts(rng, decoders, depth, vocab)):
        engine.add_request(f"mixed-dec-{i}", p, params)
    while sched.waiting:
        engine.step()
    for _ in range(4):
        engine.step()
    walls: dict[int, list[float]] = {b: [] for b in budgets}
    steps_in_prefill: dict[int, int] = {}
    step_ms: dict[int, list[float]] = {}
    try:
        t0 = time.perf_counter()
        for _ in range(window):
            engine.step()
        decode_only = (time.perf_counter() - t0) / window
        for rnd in range(rounds + 1):
            for b in budgets if rnd % 2 else tuple(reversed(budgets)):
                sched.max_num_batched_tokens = b
                rid = f"mixed-p{rnd}-{b}"
                engine.add_request(rid, rand_prompts(rng, 1, prompt, vocab)[0],
                                   SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
                t0, done, marks = time.perf_counter(), None, []
                for k in range(window):
                    if any(o.request_id == rid for o in engine.step()):
                        done = k + 1
                    marks.append(time.perf_counter())
                wall = time.perf_counter() - t0
                step_ms[b] = [round(1e3 * (z - a), 1) for a, z in zip([t0] + marks, marks)][:8]
                if done is None:
                    raise RuntimeError(f"budget {b}: the prompt did not finish within {window} steps")
                steps_in_prefill[b] = done
                if rnd:
                    walls[b].append(wall)
        record(tag, f"mixed prefill ({decoders} decoders @{depth}, one {prompt}-token prompt, {window} steps)", {
            "decode_only_ms_per_step": round(1e3 * decode_only, 2),
            "window_s_by_budget": {b: [round(w, 3) for w in ws] for b, ws in walls.items()},
            "excess_ms_over_decode_only": {b: round(1e3 * (statistics.median(ws) - window * decode_only), 1)
                                           for b, ws in walls.items()},
            "steps_until_first_token": steps_in_prefill, "first_8_step_ms_last_round": step_ms})
        if torch.cuda.is_available() and decoders:
            profile_mixed(tag, engine, rng, prompt, window)
    finally:
        sched.max_num_batched_tokens = keep
        engine.abort_all()


def wave(tag: str, engine: LLMEngine, budgets=(8192, 8224, 16384, 16416), n: int = 32, prompt: int = 8192,
         out_tokens: int = 64, rounds: int = 2) -> None:
    """serve-8k1k-c32's waves in-process, by step token budget: n `prompt`-token requests (`out_tokens` each,
    ignore_eos) arrive at once and the engine steps until all finish. With a fixed output length the benchmark's 32
    requests finish and arrive together, so a wave's prompts prefill back to back while the earlier ones decode;
    what a budget changes lies in this window (the rest of a wave is b32 decode steps, the same for every budget).
    Lower wall is better. Budgets alternate over `rounds` after a warm-up round (4 output tokens)."""
    vocab, rng = engine.model_config.vocab_size, random.Random(23)
    sched = engine.scheduler
    keep = sched.max_num_batched_tokens

    def one(b: int, rid: str, out: int) -> tuple[float, list[float]]:
        sched.max_num_batched_tokens = b
        params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
        for i, p in enumerate(rand_prompts(rng, n, prompt, vocab)):
            engine.add_request(f"{rid}-{i}", p, params)
        t0 = time.perf_counter()
        marks = [t0]
        while engine.has_unfinished_requests():
            engine.step()
            marks.append(time.perf_counter())
        return marks[-1] - t0, [1e3 * (z - a) for a, z in zip(marks, marks[1:])]

    walls: dict[int, list[float]] = {b: [] for b in budgets}
    shape: dict[int, dict] = {}
    try:
        for b in budgets:
            one(b, f"wave-warm-{b}", 4)
        for rnd in range(rounds):
            for b in budgets if rnd % 2 == 0 else tuple(reversed(budgets)):
                wall, ms = one(b, f"wave-{rnd}-{b}", out_tokens)
                walls[b].append(wall)
                big = [t for t in ms if t > 50]
                shape[b] = {"steps": len(ms), "steps_over_50ms": len(big),
                            "ms_in_steps_over_50ms": round(sum(big), 1),
                            "median_ms_of_steps_over_50ms": round(statistics.median(big), 1) if big else None}
        record(tag, f"wave ({n} x {prompt}-token prompts at once, {out_tokens} output tokens each)", {
            "wall_s_by_budget": {b: [round(w, 3) for w in ws] for b, ws in walls.items()},
            "median_wall_s": {b: round(statistics.median(ws), 3) for b, ws in walls.items()},
            "last_round_steps": shape})
    finally:
        sched.max_num_batched_tokens = keep
        engine.abort_all()


def profile_mixed(tag: str, engine: LLMEngine, rng: random.Random, prompt: int, window: int, top: int = 14) -> None:
    """Two more mixed_prefill trials at the scheduler's current budget: one under the torch profiler (host and
    device time by op over 6 steps), one under cProfile (Python time over the prompt's two eager launches and the
    step after them)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    def add_prompt(rid: str) -> None:
        engine.add_request(rid, rand_prompts(rng, 1, prompt, engine.model_config.vocab_size)[0],
                           SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))

    add_prompt("mixed-profiled")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(min(window, 6)):
            engine.step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:top]
    dev = sorted(ev, key=lambda e: -getattr(e, "self_device_time_total", 0.0))[:top]
    record(tag, f"mixed prefill profile (budget {engine.scheduler.max_num_batched_tokens}, 6 steps)", {
        "top_cpu_self [name, calls, ms]": [[e.key[:60], e.count, round(e.self_cpu_time_total / 1e3, 2)] for e in cpu],
        "top_device_self [name, calls, ms]": [[e.key[:60], e.count,
                                               round(getattr(e, "self_device_time_total", 0.0) / 1e3, 2)]
                                              for e in dev]})
    add_prompt("mixed-cprofiled")
    cp = cProfile.Profile()
    cp.enable()
    for _ in range(3):
        engine.step()
    cp.disable()
    stats = pstats.Stats(cp).stats
    record(tag, "mixed prefill host cProfile (3 steps) [name, cumulative ms, self ms]",
           {"cumulative": cprofile_table(stats, 3, 1, 30), "self": cprofile_table(stats, 2, 1, 30)})


def check_logits(tag: str, engine: LLMEngine) -> None:
    """One fresh 64-token prompt straight through the model: logits finite, their spread."""
    rng = random.Random(7)
    lg = prompt_logits(engine.model, rand_prompts(rng, 2, 64, engine.model_config.vocab_size), engine.device)
    record(tag, "logits check", {"finite": bool(torch.isfinite(lg).all()), "std": float(lg.std()),
                                 "max": float(lg.max())})


def graph_vs_eager(tag: str, graph_engine: LLMEngine, eager_engine: LLMEngine) -> None:
    prompts = rand_prompts(random.Random(11), 2, 256, graph_engine.model_config.vocab_size)
    a, b = generate(graph_engine, prompts, 24), generate(eager_engine, prompts, 24)
    record(tag, "greedy graphs vs eager (same ids)", {**same_ids(a, b),
                                                       "first_diff": [next((i for i, (x, y) in enumerate(zip(p, q))
                                                                            if x != y), None) for p, q in zip(a, b)]})


def overlap_vs_plain(tag: str, engine: LLMEngine, args) -> None:
    """The same engine with step overlap off: greedy ids must not change; decode speed at b1 and b32 without it."""
    prompts = rand_prompts(random.Random(13), 4, 256, engine.model_config.vocab_size)
    with_overlap = generate(engine, prompts, 24)
    engine.overlap = False
    try:
        plain = generate(engine, prompts, 24)
        record(tag, "greedy overlap vs no overlap (same ids)", same_ids(with_overlap, plain))
        bench_decode(tag + " no-overlap", engine, 1, args.depth, args.gen_b1, 1)
        bench_decode(tag + " no-overlap", engine, 32, args.depth, 64, 1)
    finally:
        engine.overlap = True


def profile_prefill(tag: str, engine: LLMEngine, n: int, top: int = 16) -> None:
    """Kernels of one n-token prefill (torch profiler, CUDA activity): device time per kernel name."""
    from torch.profiler import ProfilerActivity, profile

    ids = rand_prompts(random.Random(17), 1, n, engine.model_config.vocab_size)[0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _prefill_once(engine, ids)
        sync(engine.device)
    rows = [(e.key, e.count, getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))
            for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])
    record(tag, f"prefill {n} kernels", {
        "launches": sum(r[1] for r in rows), "device_ms": round(sum(r[2] for r in rows) / 1e3, 2),
        "top [name, launches, ms]": [[k[:70], c, round(us / 1e3, 2)] for k, c, us in rows[:top]]})


def side_stream_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int) -> None:
    """The same model with its decode graphs on one stream (no_side_stream), then the fp8 prefill projections
    through scaled_mm instead of dequant + cuBLAS: greedy ids must not change; decode-b1 / b32, prefill and replay
    of each, measured right after the default engine's own figures."""
    from qnext.ops import triton_linear_fp8

    prompts = rand_prompts(random.Random(19), 3, 200, cfg.vocab_size)
    ids = generate(engine, prompts, 16)
    one = guarded(f"{tag} one-stream engine", 20, engine_for, model, cfg, device, False, max_len,
                  no_side_stream=True)
    if one is None:
        return
    one_tag = tag + " one stream"
    record(one_tag, "greedy ids == side-stream engine", same_ids(ids, generate(one, prompts, 16)))
    guarded(f"{one_tag} decode-b1", 15, bench_decode, one_tag, one, 1, args.depth, args.gen_b1, 1)
    guarded(f"{one_tag} decode-b32", 20, bench_decode, one_tag, one, 32, args.depth, 64, 1)
    guarded(f"{one_tag} prefill", 15, bench_prefill, one_tag, one, args.prefill, 1)
    guarded(f"{one_tag} replay", 5, bench_replay, one_tag, one)
    del one
    free_memory()
    saved = triton_linear_fp8.LARGE_M_PATH
    triton_linear_fp8.LARGE_M_PATH = "scaled_mm"                 # every prefill projection through scaled_mm
    try:
        guarded(f"{tag} prefill scaled_mm", 15, bench_prefill, tag + " fp8 prefill via scaled_mm", engine,
                args.prefill, 2)
    finally:
        triton_linear_fp8.LARGE_M_PATH = saved


@contextlib.contextmanager
def settings(*values):
    """Module attributes (module, name, value) set inside the block, restored after."""
    import importlib
    saved = []
    for module, name, value in values:
        mod = importlib.import_module(module)
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def engines_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int, cases, *,
               b32: bool = False, repeats: int = 2) -> None:
    """Each case (name, setting: a context-manager factory, engine kwargs, profile the b1 step?) as a fresh engine
    on the same model, its graphs captured under the setting: greedy ids against `engine`'s, decode-b1 (and b32),
    then the replays (after the decode runs: a graph replays the inputs it last held, and right after capture
    those reach fewer experts, so earlier replays are not comparable)."""
    prompts = rand_prompts(random.Random(23), 3, 200, cfg.vocab_size)
    ids = generate(engine, prompts, 16)
    for name, setting, kw, profile in cases:
        with setting():
            other = guarded(f"{tag} {name} engine", 40, engine_for, model, cfg, device, False, max_len, **kw)
            if other is None:
                return
            t = f"{tag} {name}"
            record(t, "greedy ids == default engine", same_ids(ids, generate(other, prompts, 16)))
            guarded(f"{t} decode-b1", 15, bench_decode, t, other, 1, args.depth, args.gen_b1, repeats)
            if b32:
                guarded(f"{t} decode-b32", 20, bench_decode, t, other, 32, args.depth, 64, 1)
            guarded(f"{t} replay", 5, bench_replay, t, other)
            if profile:
                guarded(f"{t} profile", 5, profile_step, t, other, 40)
            del other
            free_memory()


def knobs_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int) -> None:
    """Other decode settings: the decode projections unfused (SwiGLU apart from the down GEMV, the GEMV pairs
    apart; FUSE_DECODE_PROJECTIONS off), the FP8 GEMV's previous accumulator, one stream (no_side_stream), then
    also without programmatic dependent launch (QNEXT_PDL=0, whose step profile gives each kernel's own duration,
    no PDL waits inside). Greedy ids must not change, except under the other accumulator (other rounding:
    near-tied logits of random weights may flip); decode-b1 / b32 and the replays of each."""
    from qnext.ops import pdl

    one = dict(no_side_stream=True)
    fused, fp8 = "qnext.ops.triton_fused_linear", "qnext.ops.triton_linear_fp8"
    engines_ab(tag, model, cfg, engine, device, args, max_len, [
        ("separate projection kernels", lambda: settings((fused, "FUSE_DECODE_PROJECTIONS", False)), {}, False),
        ("GEMV [BN, NG, 128] accumulator", lambda: settings((fp8, "GEMV_STEP_SUM", False)), {}, False),
        ("one stream", contextlib.nullcontext, one, False),
        ("one stream, no PDL", pdl.pdl_disabled, one, True)], b32=True, repeats=1)


def early_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int) -> None:
    """The batch-1 chain's shorter links, all off and each off alone: the routing beside the shared down
    projection in one launch (FUSE_ROUTE), the experts' down weights loaded before the PDL wait (EARLY_DOWN_LOAD),
    the GDN conv and recurrent states loaded before it (EARLY_STATE_LOAD). Greedy ids against the default engine
    (the fused routing sums its softmax over 4 warps instead of 1: near-tied logits of random weights may flip);
    decode-b1, the replays, and the step profile with all off."""
    route = [("qnext.ops.triton_fused_linear", "FUSE_ROUTE", False)]
    down = [("qnext.ops.triton_moe_gemv_mma", "EARLY_DOWN_LOAD", False)]
    states = [("qnext.ops.fla_gdn", "EARLY_STATE_LOAD", False), ("qnext.ops.triton_conv1d", "EARLY_STATE_LOAD", False)]
    engines_ab(tag, model, cfg, engine, device, args, max_len, [
        (name, lambda values=values: settings(*values), {}, name == "all off")
        for name, values in (("all off", route + down + states), ("route apart", route),
                             ("down weights after the wait", down), ("GDN states after the wait", states),
                             ("all on again", []))])


def out_norm_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int) -> None:
    """The GDN output norm finished in out_proj's GEMV (FUSE_OUT_NORM: the recurrent kernel gates o and sums each
    head's squares, the GEMV scales each head's sums), the norm kernel between them, then in out_proj again,
    whatever the default; greedy ids against the default engine (the norm's output is rounded before its head
    scale in out_proj: near-tied logits of random weights may flip); decode-b1, the replays and the step profile
    of each."""
    knob = ("qnext.ops.triton_fused_linear", "FUSE_OUT_NORM")
    engines_ab(tag, model, cfg, engine, device, args, max_len, [
        (name, lambda on=on: settings((*knob, on)), {}, True)
        for name, on in (("GDN out norm in out_proj", True), ("GDN out norm apart", False),
                         ("in out_proj again", True))])


def conv_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int) -> None:
    """The GDN decode conv in the in_proj GEMV pair's epilogue (FUSE_IN_PROJ_CONV) against the pair and the conv
    kernel apart, and the fused conv's state loaded after the K loop (CONV_EARLY_LOAD off); greedy ids must not
    change; decode-b1, the replays and the step profile of each."""
    fused = "qnext.ops.triton_fused_linear"
    engines_ab(tag, model, cfg, engine, device, args, max_len, [
        (name, lambda values=values: settings(*values), {}, True)
        for name, values in (("in_proj and conv apart", [(fused, "FUSE_IN_PROJ_CONV", False)]),
                             ("conv state loaded after the K loop", [(fused, "CONV_EARLY_LOAD", False)]),
                             ("all on again", []))])


# Batch-1 expert GEMV tilings per expert format (--extras tiles): (name, GEMV_DEFAULTS entries, module settings).
# H100, 2026-12-06 fourth session (docs/benchmarks.md): int4's gate_up with 2 rows on 2 warps (the default since)
# replayed b1 in 2.17 ms against 2.31 at 1 row on 1 warp (102 registers either way, half the programs); fp8 on
# tensor cores in the split mode (the default since) 2.34 against 2.39-2.40 on CUDA cores, and the down weights
# loaded after the PDL wait 2.46-2.48 (that variant is gone from the list).
# fifth session: fp8's dots in fp16 (activations scaled into fp16 by a power of two, one conversion per two
# weights instead of three instructions; removed) replayed 2.43-2.45 ms against 2.36 in bf16.
# sixth session (a chain with the shared expert routed as expert E, since removed; default 2.430 ms): fp8 gate_up
# 2 rows on 1 warp 2.547, 4 rows on 2 warps 2.553, 2 rows on 2 warps 2.453, CUDA cores 2.463; with the chain of 4
# launches: default 2.333, one stage (mst=1, 122-130 registers) 2.457; after 58e7a53 (no F2F): default 2.297, K in
# 2 steps (mks1=64, 68 registers: 1.4 waves) 2.333, in 4 steps (mks1=32, 64 registers) 2.426, 2 rows on 2 warps
# 2.330, CUDA cores 2.401. seventh session: the fp8 down kernel's slice width (default 32 units: 784 instructions
# per program, 93 registers, offline SASS) at 64 (680, 72) 2.320 and at 128 (640, 63) 2.329 against the default's
# 2.286 (both gone from the list); 2 rows on 2 warps 2.312, mks1=64 2.322, CUDA cores 2.377.
TILE_VARIANTS = {
    "int4": [("default tiles (A/B engines run behind the first one)", {}, []),
             ("gate_up 1 row on 1 warp", dict(mbm1=1, mw1=1), []),
             ("gate_up 4 rows on 4 warps", dict(mbm1=4, mw1=4), [])],
    "fp8": [("default tiles (A/B engines run behind the first one)", {}, []),
            ("fp8 gate_up 2 rows on 2 warps", dict(mbm1=2, mw1=2), []),
            ("fp8 gate_up K in 2 steps (mks1=64: 68 registers)", dict(mks1=64), []),
            ("fp8 experts on CUDA cores", dict(mma=False), [])],
}


def tiles_ab(tag: str, model, cfg, engine: LLMEngine, device: str, args, max_len: int, scheme_name: str) -> None:
    """The experts' batch-1 GEMV tilings of TILE_VARIANTS for the variant's expert format (other tilings sum in
    another order: near-tied greedy ids may flip)."""
    from qnext.ops import triton_moe_gemv
    from qnext.ops.triton_moe_weights import FP8, INT4

    kind = FP8 if scheme_name == "fp8" else INT4

    def tiling(over: dict, values: list):
        tiles = {k: dict(v) for k, v in triton_moe_gemv.GEMV_DEFAULTS.items()}
        tiles[kind].update(over)
        return settings(("qnext.ops.triton_moe_gemv", "GEMV_DEFAULTS", tiles), *values)

    engines_ab(tag, model, cfg, engine, device, args, max_len, [
        (name, lambda over=over, values=values: tiling(over, values), {}, False)
        for name, over, values in TILE_VARIANTS["fp8" if kind == FP8 else "int4"]])


def deep_ab(tag: str, model, cfg, device: str, args) -> None:
    """serve-8k1k-c32's decode step: 32 sequences at args.deep context, each a fresh engine with room for them
    (12 GB of cache): the default cache formats (decode b32, then a device trace with time per kernel), then
    ssm_state_dtype bfloat16, kv_cache_dtype fp8, both, and the FP8 w8a16 decode tiles without the weights-first
    ones (SMALL_M_SWAP False) (decode b32; greedy ids against the default engine's, which reduced-precision caches
    and another summation order may change)."""
    d, max_len = args.deep, args.deep + 512
    prompts = rand_prompts(random.Random(29), 3, 200, cfg.vocab_size)
    ids = None
    unswapped = ("qnext.ops.triton_linear_fp8", "SMALL_M_SWAP", False)
    for name, kw, values in (("default formats", {}, []), ("bf16 GDN states", dict(ssm_state_dtype="bfloat16"), []),
                             ("fp8 KV cache", dict(kv_cache_dtype="fp8"), []),
                             ("bf16 states + fp8 KV", dict(ssm_state_dtype="bfloat16", kv_cache_dtype="fp8"), []),
                             ("FP8 w8a16 all unswapped", {}, [unswapped])):
        with settings(*values):
            other = guarded(f"{tag} {name} engine", 40, engine_for, model, cfg, device, False, max_len,
                            kv_cache_memory_gb=12.0, **kw)
            if other is None:
                return
            t = f"{tag} {name}"
            got = generate(other, prompts, 16)
            if ids is None:
                ids = got
            else:
                record(t, "greedy ids == default formats", same_ids(ids, got))
            guarded(f"{t} steady b32 @ {d}", 40, bench_steady, t, other, 32, d)
            if name in ("default formats", "fp8 KV cache"):
                guarded(f"{t} trace @ {d}", 30, trace_steps, t, other, b=32, depth=d)
            del other
            free_memory()


def full_variant(tag: str, preset: str, scheme_name: str, device: str, args, extended: bool) -> None:
    cfg, model, nbytes = build_full(preset, scheme_name, device, args.num_experts)
    R["bench"].setdefault(tag, {})["weights_GiB"] = nbytes / 2**30
    max_len = max(args.prefill, args.depth + args.gen_b1) + 512
    engine = guarded(f"{tag} engine", 20, engine_for, model, cfg, device, False, max_len)
    if engine is None:                                     # graph capture failed: measure eagerly
        free_memory()
        tag += " (eager: capture failed)"
        engine = guarded(f"{tag} engine", 20, engine_for, model, cfg, device, True, max_len)
        extended = False
    if engine is None:
        return
    d = args.depth
    guarded(f"{tag} logits", 10, check_logits, tag, engine)
    guarded(f"{tag} decode-b1", 15, bench_decode, tag, engine, 1, d, args.gen_b1, 2)
    guarded(f"{tag} prefill-{args.prefill}", 15, bench_prefill, tag, engine, args.prefill, 2)
    if extended:
        guarded(f"{tag} decode-b8", 15, bench_decode, tag, engine, 8, d, 64, 1)
        guarded(f"{tag} decode-b32", 20, bench_decode, tag, engine, 32, d, 64, 1)
    if device == "cuda":
        guarded(f"{tag} replay", 5, bench_replay, tag, engine)
        guarded(f"{tag} profile", 5, profile_step, tag, engine)
        guarded(f"{tag} prefill profile", 10, profile_prefill, tag, engine, args.prefill)
    if extended and "outnorm" in args.extras:
        guarded(f"{tag} out norm A/B", 70, out_norm_ab, tag, model, cfg, engine, device, args, max_len)
    if extended and "conv" in args.extras:
        guarded(f"{tag} conv A/B", 100, conv_ab, tag, model, cfg, engine, device, args, max_len)
    if extended and "knobs" in args.extras:
        guarded(f"{tag} knobs A/B", 100, knobs_ab, tag, model, cfg, engine, device, args, max_len)
    if extended and "early" in args.extras:
        guarded(f"{tag} early A/B", 200, early_ab, tag, model, cfg, engine, device, args, max_len)
    if extended and "tiles" in args.extras:
        guarded(f"{tag} tiles A/B", 100, tiles_ab, tag, model, cfg, engine, device, args, max_len, scheme_name)
    if extended and "deep" in args.extras:
        del engine
        free_memory()
        guarded(f"{tag} deep A/B", 120, deep_ab, tag, model, cfg, device, args)
        return
    if extended and "ab" in args.extras:
        guarded(f"{tag} side stream A/B", 60, side_stream_ab, tag, model, cfg, engine, device, args, max_len)
    if extended and "host" in args.extras:
        guarded(f"{tag} host profile", 15, profile_host, tag, engine)
        guarded(f"{tag} overlap vs plain", 20, overlap_vs_plain, tag, engine, args)
    if extended and "trace" in args.extras:
        guarded(f"{tag} device trace", 20, trace_steps, tag, engine, b=args.trace_batch)
    if extended and "mixed" in args.extras:
        guarded(f"{tag} mixed prefill", 40, mixed_prefill, tag, engine, depth=args.depth,
                prompt=args.prefill)
    if extended and "wave" in args.extras:                 # serve-8k1k-c32's prefill waves by budget
        guarded(f"{tag} wave", 60, wave, tag, engine, prompt=args.prefill)
    if extended and "lone" in args.extras:                 # the same with nothing else running: TTFT by budget
        guarded(f"{tag} lone prefill", 20, mixed_prefill, tag, engine, decoders=0, prompt=args.prefill, rounds=1)
    eager = None
    if extended and "eager" in args.extras:
        eager = guarded(f"{tag} eager engine", 25, engine_for, model, cfg, device, True, max_len)
        if eager is not None:
            guarded(f"{tag} eager decode-b1", 15, bench_decode, tag + " eager", eager, 1, d, 64, 1)
            guarded(f"{tag} graphs vs eager", 10, graph_vs_eager, tag, engine, eager)
        del eager
    del engine, model
    free_memory()


def summary() -> str:
    lines = [f"device: {R['env'].get('device')} | {R['env'].get('nvidia_smi')} | torch {R['env'].get('torch')} "
             f"triton {R['env'].get('triton')} fla {R['env'].get('fla')} | {R['env'].get('date')}", "",
             "| variant | measurement | value |", "|---|---|---|"]
    for tag, rows in R["bench"].items():
        for name, v in rows.items():
            if isinstance(v, dict) and "tokens_per_s" in v:
                extra = (f", {v['ms_per_step']:.2f} ms/step" if "ms_per_step" in v
                         else f", TTFT {v['ttft_ms']:.0f} ms" if "ttft_ms" in v else "")
                lines.append(f"| {tag} | {name} | {v['tokens_per_s']:.1f} tok/s{extra} |")
            else:
                lines.append(f"| {tag} | {name} | {v} |")
    lines.append("")
    for name, v in R["parity"].items():
        lines.append(f"parity {name}: {'PASS' if v.get('pass') else 'FAIL'} "
                     f"{ {k: v[k] for k in v if k not in ('ids', 'cpu_ids')} }")
    lines.append(f"errors: {R['errors']}")
    return "\n".join(lines)


def main() -> None:
    global BUDGET, OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="qwen3-coder-next")
    ap.add_argument("--gen-b1", type=int, default=256)
    ap.add_argument("--depth", type=int, default=1024, help="context of the decode measurements")
    ap.add_argument("--prefill", type=int, default=8192, help="prompt length of the prefill measurement")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--num-experts", type=int, default=0, help="routed experts of the full-size model (default: "
                    "the preset's); fewer keep the bytes per token (FP8 experts on an H100)")
    ap.add_argument("--trace-batch", type=int, default=32, help="batch of the device trace (--extras trace)")
    ap.add_argument("--deep", type=int, default=8192, help="context of the b32 decode A/B (--extras deep)")
    ap.add_argument("--variants", default="int4,int4-bf16",
                    help="full-size variants in order: int4 (int4 experts + FP8 dense, extended), fp8 (FP8 "
                         "experts + FP8 dense), int4-bf16 (int4 experts + bf16 dense)")
    ap.add_argument("--extras", default="ab,host,trace,eager",
                    help="extended measurements of the first variant: tiles (batch-1 expert GEMV tilings A/B), "
                         "deep (b32 decode at --deep context: trace and "
                         "cache formats A/B; ends the variant), knobs (decode settings A/B), conv (the GDN decode "
                         "conv fused or apart), outnorm (the GDN output norm in out_proj or apart), ab (side "
                         "stream and fp8 prefill A/B), host (cProfile, overlap A/B), "
                         "trace (device trace of b32 steps), mixed "
                         "(a prompt's cost to running decodes by token budget), lone (the same prompt alone), wave "
                         "(32 prompts at once by budget), eager "
                         "(eager engine)")
    args = ap.parse_args()
    args.extras = set(args.extras.split(",")) if args.extras else set()
    BUDGET, OUT = args.budget, args.out
    os.makedirs(OUT, exist_ok=True)
    logging_setup()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))     # `timeout`: still write the summary below
    try:
        env(args.device)
        if not args.skip_parity:
            guarded("parity bf16", 30, parity_case, None, args.device, 4e-2, 0.05)
        tags = {"int4": "int4+fp8", "fp8": "fp8+fp8", "int4-bf16": "int4+bf16"}
        for i, name in enumerate(args.variants.split(",")):
            guarded(f"full {name}", 60, full_variant, tags[name], args.preset, name, args.device, args, i == 0)
            if i == 0 and not args.skip_parity:
                guarded("parity int4", 25, parity_case, "int4", args.device, 6e-2, 0.1)
    finally:
        text = summary()
        with open(os.path.join(OUT, "gpu_e2e.md"), "w") as f:
            f.write(text + "\n")
        save()
        print(text, flush=True)


def logging_setup() -> None:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)


if __name__ == "__main__":
    main()
