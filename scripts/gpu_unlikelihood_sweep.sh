#!/usr/bin/env bash
# Unlikelihood fine-tunes of the bundled demo (scripts/unlikelihood_demo.py) on one GPU, several settings at once,
# each then scored by `qnext eval complete` on the CPU machine's held-out headers; the best two checkpoints come
# back. The model is so small that one process leaves the GPU mostly idle (HF generate is launch bound), so the
# settings run side by side.
#   scripts/gpu_unlikelihood_sweep.sh OUT CORPUS MINUTES
# CORPUS holds train.txt.gz and heldout_headers.jsonl from `scripts/build_corpus.py --out` on a machine whose
# stdlib has its test suite (the CPU machine), and heldout.txt. Settings: "name lr ul_weight ul_tokens lm_batch"
# lines in $SWEEP, or the defaults below. Each checkpoint (and the bundled demo, "base") is also scored by
# `qnext eval ppl` on heldout.txt. Of the two that come back, one has the lowest perplexity among those with at
# least $MIN_PARSED parsed completions, the other the most parsed completions.
set -uo pipefail
out=$1 corpus=$2 minutes=${3:-3.5}
work=/tmp/ul-sweep
mkdir -p "$work" "$out"
sweep=${SWEEP:-"e 1e-4 0.3 all 16
f 5e-5 0.3 all 16
g 1e-4 1.0 first 16
h 1e-4 0.15 all 16"}
pids=()
score() {  # checkpoint name
  python3 -m qnext eval complete --model "$1" --data "$corpus/heldout_headers.jsonl" \
      --result-file "$work/$2.complete.json" > "$work/$2.complete.log" 2>&1
  python3 -m qnext eval ppl --model "$1" --data "$corpus/heldout.txt" --result-file "$work/$2.ppl.json" \
      > "$work/$2.ppl.log" 2>&1
}
(score qnext/assets/demo base) &
pids+=($!)
while read -r name lr w toks lm; do
  (python3 scripts/unlikelihood_demo.py --out "$work/$name" --minutes "$minutes" --batch 64 --lr "$lr" \
      --ul-weight "$w" --ul-tokens "$toks" --lm-batch "${lm:-0}" --threads 2 --extra-train "$corpus/train.txt.gz" \
      --log-json "$work/$name.train.json" > "$work/$name.train.log" 2>&1 && score "$work/$name" "$name") &
  pids+=($!)
done <<< "$sweep"
wait "${pids[@]}"
tail -n 3 "$work"/*.log
# the chosen two come back: their weight shards, renamed NAME-FILE
best=$(python3 - "$work" "${MIN_PARSED:-65}" <<'EOF'
import json, pathlib, sys
work, min_parsed = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = []
for p in sorted(work.glob("*.complete.json")):
    name = p.name.split(".")[0]
    r = json.loads(p.read_text())
    ppl = json.loads((work / f"{name}.ppl.json").read_text())["ppl"] if (work / f"{name}.ppl.json").exists() else 1e9
    print(name, "parsed", r["parsed"], "lenient", r["parsed_lenient"], "ended", r["ended"], "ppl", ppl, file=sys.stderr)
    if name != "base":
        rows.append((r["parsed"], ppl, name))
good = sorted((ppl, name) for parsed, ppl, name in rows if parsed >= min_parsed)
most = max(rows)[2] if rows else ""
print(" ".join(dict.fromkeys(([good[0][1]] if good else []) + [most])))
EOF
)
for name in $best; do
  for f in "$work/$name"/*.safetensors; do cp "$f" "$out/$name-$(basename "$f")"; done
done
tar -C "$work" -czf "$out/sweep-logs.tgz" --exclude='*.safetensors' $(cd "$work" && ls -d *.json *.log */)
echo "best: $best"
