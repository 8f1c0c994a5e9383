#!/usr/bin/env bash
# serve-8k1k-c32 (shared/bench-protocol.md) against a real `qnext serve` process on full-size synthetic weights:
#
#   scripts/gpu_serve_bench.sh OUT_DIR [extra `qnext serve` flags...]
#
# 1. `qnext synth --config-only`: the Qwen3-Coder-Next config and a full-vocabulary tokenizer, no weights;
# 2. `qnext serve --synthetic`: int4 routed experts + FP8 dense made on the GPU, decode CUDA graphs up to 32 seqs,
#    the default step token budget (16384 on the H200);
# 3. a warm-up burst (c requests at concurrency c, 16 output tokens each; not measured): the server's Triton
#    kernels meet the shapes of mixed prefill + decode steps before the clock starts (on a cold Triton cache their
#    JIT compiles stalled the first measured wave by ~18 s on the H200, 2026-12-02);
# 4. `qnext bench serve`: 64 requests (SERVE_BENCH_PROMPTS; bench-protocol.md's figure is 512) of 8192 random
#    prompt tokens and 1024 output tokens (ignore_eos), 32 at a time, after 2 warm-up requests; then a short c1 run
#    (4 requests) for the unloaded TPOT (SERVE_BENCH_C1=0 skips it). 512 prompts with SERVE_BENCH_C1=0 took 525 s on
#    an H100 with the Triton cache carried in (ready 74 s, warm-up burst ~25 s, making the prompts ~24 s, the run
#    394 s; docs/benchmarks.md 2026-12-05): one device call of its own.
# OUT_DIR gets warmup_burst.json, serve_c32.json, serve_c1.json, server.log and metrics.txt (/metrics after the runs).
# Off the GPU, SERVE_BENCH_SMALL=1 runs the same steps on the tiny preset (a check of the script, not a figure).
# Needs qnext's server packages; the GPU machine lacks fastapi, uvicorn, starlette, pydantic (+ pydantic-core,
# annotated-types, typing-inspection), sniffio and opentelemetry-api: carry them as wheels (scripts/device_wheels.sh).
set -euo pipefail
out=${1:?usage: gpu_serve_bench.sh OUT_DIR [serve flags...]}
shift
mkdir -p "$out"
model=$(mktemp -d)/model
port=${SERVE_BENCH_PORT:-8765}
if [[ "${SERVE_BENCH_SMALL:-0}" == 1 ]]; then
  preset=tiny; ilen=64; olen=16; n=8; c=4; serve_flags=(--device cpu --max-num-seqs 4 --max-model-len 256)
else
  preset=qwen3-coder-next; ilen=8192; olen=1024; n=${SERVE_BENCH_PROMPTS:-64}; c=32
  serve_flags=(--device cuda --quantization int4 --max-num-seqs 32 --max-model-len 9728 --kv-cache-memory-gb 12)
fi
python3 -m qnext synth --preset "$preset" --config-only --out "$model"
python3 -m qnext serve --model "$model" --synthetic --port "$port" "${serve_flags[@]}" "$@" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
python3 - "$port" "$server" <<'EOF'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
t0 = time.time()
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
        print(f"server ready in {time.time() - t0:.0f} s", flush=True)
        break
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("the server exited before it was ready: see server.log")
        if time.time() - t0 > 400:
            sys.exit("the server was not ready after 400 s")
        time.sleep(2)
EOF
bench=(python3 -m qnext bench serve --base-url "http://127.0.0.1:$port" --tokenizer "$model"
       --random-input-len "$ilen" --random-output-len "$olen" --ignore-eos --metric-percentiles 50,90,99)
"${bench[@]}" --max-concurrency "$c" --num-prompts "$c" --random-output-len 16 --seed 2 \
  --result-file "$out/warmup_burst.json" >/dev/null
"${bench[@]}" --max-concurrency "$c" --num-prompts "$n" --num-warmups 2 --result-file "$out/serve_c$c.json"
if [[ "${SERVE_BENCH_C1:-1}" == 1 ]]; then
  "${bench[@]}" --max-concurrency 1 --num-prompts 4 --seed 1 --result-file "$out/serve_c1.json"
fi
python3 -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" \
  "http://127.0.0.1:$port/metrics" >"$out/metrics.txt"
