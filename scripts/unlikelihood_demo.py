#!/usr/bin/env python3
"""Fine-tune the demo model against greedy repetition loops: sequence-level unlikelihood (Welleck et al. 2019).

Why: the demo model's greedy completions of function headers fail mostly by looping (a body line such as
`self._writer = None` repeated until the token budget, docs/quality.md). Plain likelihood training never sees the
model's own greedy output, so nothing pushes down the probability of repeating a line it has just written.

Each step, on the model being trained:
  1. prompts: PROMPT_TOKENS tokens of a *train* file ending right after a function header (the same header rule
     and prompt shape as `qnext eval complete`, qnext/eval/heldout.py and qnext/eval/complete.py);
  2. greedy continuation of GEN_TOKENS tokens, cut where the body ends (a line indented no deeper than the def);
  3. candidates: the tokens of every body line that repeats an earlier line of the same continuation (stripped,
     at least MIN_LINE_CHARS characters with a letter or digit, so `else:` or `)` never count);
  4. loss = cross-entropy on the prompt tokens (real code: keeps the language model) + ul_weight x mean over the
     candidates of -log(1 - p(candidate)), from one forward pass over prompt + continuation; with --lm-batch N,
     plus the cross-entropy of N random train windows of --lm-window tokens (a stronger anchor for the language
     model: without it the held-out perplexity rose 7-56% in the first GPU sweep, docs/quality.md).
It logs the share of continuations that loop (a repeated line, body not ended), the quantity this lowers.

Starts from a checkpoint (default: the bundled demo) and writes an ordinary HF-layout checkpoint like
scripts/train_demo.py does. The corpus is the running interpreter's (scripts/build_corpus.py: stdlib with its test
suite when installed, held-out files and near-copies dropped by the same rule as `qnext eval`), plus
`--extra-train` train.txt files from other machines. The defaults are the setting chosen by the GPU sweeps
(scripts/gpu_unlikelihood_sweep.sh, docs/quality.md); the bundled demo is scripts/train_demo.py's output after
    python3 scripts/unlikelihood_demo.py --init OUT/demo --out OUT/demo-ul --max-steps 44 --minutes 10 \
        --threads 2 --extra-train DIR/train.txt.gz
on an H200 (44 steps; about 4 minutes end to end). A CPU step at batch 64 takes ~80 s on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
import build_corpus  # noqa: E402
import train_demo  # noqa: E402
from qnext.eval.complete import build_prompt, cut_body  # noqa: E402
from qnext.eval.heldout import file_headers  # noqa: E402

MIN_LINE_CHARS = 8
log = train_demo.log


def train_prompts(docs: list[tuple[str, str]], tok, prompt_tokens: int, context_chars: int,
                  rng: random.Random, limit: int) -> list[tuple[list[int], int]]:
    """(token ids, def indent) of up to `limit` header prompts from train documents, each exactly prompt_tokens
    long (left-truncated; shorter prompts are skipped) so a batch needs no padding."""
    out = []
    docs = list(docs)
    rng.shuffle(docs)
    for key, text in docs:
        try:
            recs = file_headers(key, text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        built = [build_prompt(rec, context_chars) for rec in recs]
        encoded = tok.encode_batch([prompt for prompt, _ in built], add_special_tokens=False)
        out.extend((enc.ids[-prompt_tokens:], indent) for enc, (_, indent) in zip(encoded, built)
                   if len(enc.ids) >= prompt_tokens)
        if len(out) >= limit:
            break
    rng.shuffle(out)
    return out


def repeated_line_tokens(pieces: list[str], indent: int, first_only: bool = False) -> tuple[list[int], bool, bool]:
    """For one greedy continuation given as per-token strings: (indices of tokens that belong to a repeated body
    line, whether the body ended within the continuation, whether any line repeated). first_only: only the first
    token of each repeated line (where the model chose to start the repeat). Tokens after the body's end are never
    candidates."""
    text = "".join(pieces)
    body, ended = cut_body(text, indent)
    seen, spans, pos = set(), [], 0
    for line in body.split("\n"):
        s = line.strip()
        if len(s) >= MIN_LINE_CHARS and any(c.isalnum() for c in s):
            if s in seen:
                start = pos + len(line) - len(line.lstrip())
                spans.append((start, pos + len(line)))
            seen.add(s)
        pos += len(line) + 1
    cands, hit, at = [], set(), 0
    for i, p in enumerate(pieces):
        a, b = at, at + len(p)
        at = b
        if a >= len(body):
            break
        span = next((j for j, (s, e) in enumerate(spans) if a < e and b > s), None)
        if span is not None and not (first_only and span in hit):
            cands.append(i)
            hit.add(span)
    return cands, ended, bool(spans)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default=str(REPO / "qnext" / "assets" / "demo"), help="checkpoint to start from")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--log-json", default=None)
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock fine-tuning budget")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra-train", action="append", default=[], metavar="TRAIN_TXT")
    p.add_argument("--prompt-tokens", type=int, default=320)
    p.add_argument("--context-chars", type=int, default=2000)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ul-weight", type=float, default=0.15)
    p.add_argument("--ul-tokens", choices=("first", "all"), default="all",
                   help="penalise the first token of each repeated line, or all of its tokens")
    p.add_argument("--lm-batch", type=int, default=16, help="train windows of plain cross-entropy per step")
    p.add_argument("--lm-window", type=int, default=1024)
    p.add_argument("--aux-loss", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 2048 scored before and after")
    p.add_argument("--log-every", type=float, default=30.0)
    p.add_argument("--shard-mb", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    log(f"GDN kernels: {train_demo.gdn_kernels(cuda, 'torch')}")  # fla-core's backward is unusable there
    init = Path(a.init)
    cfg = json.loads((init / "config.json").read_text())
    tok = Tokenizer.from_file(str(init / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    eos_ids = set(cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]])
    model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32).to(device)
    model.config.output_router_logits = False  # asked for only in the training forward (generate breaks)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    corpus = build_corpus.collect()
    docs = list(corpus["train"])
    for path in a.extra_train:
        have = {t for _, t in docs}
        docs += [("extra/" + str(i), t) for i, t in enumerate(build_corpus.read_docs(path)) if t not in have]
    prompts = train_prompts(docs, tok, a.prompt_tokens, a.context_chars, rng, limit=200_000)
    held_ids = train_demo.encode_docs(tok, [t for _, t in corpus["heldout"]], eot)
    train_ids = torch.from_numpy(train_demo.encode_docs(tok, [t for _, t in docs], eot).astype(np.int64)) \
        if a.lm_batch else None
    n_win = min(a.eval_windows, len(held_ids) // 2049)
    held = torch.from_numpy(held_ids[: n_win * 2049].astype(np.int64)).view(n_win, 2049).to(device)
    log(f"{len(docs)} train documents, {len(prompts)} header prompts of {a.prompt_tokens} tokens, "
        f"{n_win} held-out windows")
    before = train_demo.heldout_loss(model, held, 4, autocast) if n_win else float("nan")
    log(f"held-out loss before: {before:.4f} (ppl {math.exp(before):.3f})")

    opt = torch.optim.AdamW(train_demo.param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=cuda)
    P, G, B = a.prompt_tokens, a.gen_tokens, a.batch
    budget, start, step, last_log = a.minutes * 60, time.time(), 0, 0.0
    window = {"loops": 0, "ended": 0, "seqs": 0, "cands": 0, "ce": 0.0, "ul": 0.0, "lm": 0.0, "steps": 0}
    curve = []
    while time.time() - start < budget and (not a.max_steps or step < a.max_steps):
        batch = [prompts[(step * B + i) % len(prompts)] for i in range(B)]
        x = torch.tensor([ids for ids, _ in batch], device=device)
        model.eval()
        with torch.no_grad(), autocast():
            seqs = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=G, do_sample=False,
                                  pad_token_id=eot)
        model.train()
        gen = seqs[:, P:].tolist()
        mask = torch.zeros(B, seqs.shape[1], dtype=torch.bool)
        for r, ((_, indent), toks) in enumerate(zip(batch, gen)):
            stop = next((i for i, t in enumerate(toks) if t in eos_ids), None)
            toks = toks[:stop]  # an end-of-sequence token ends the body, as in `qnext eval complete`
            pieces = [tok.decode([t], skip_special_tokens=False) for t in toks]
            cands, ended, repeats = repeated_line_tokens(pieces, indent, a.ul_tokens == "first")
            ended = ended or stop is not None
            mask[r, [P + i for i in cands]] = True
            window["loops"] += repeats and not ended
            window["ended"] += ended
        window["seqs"] += B
        mask = mask.to(device)
        with autocast():
            out = model(input_ids=seqs, use_cache=False, output_router_logits=a.aux_loss > 0)
        logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
        tgt_logp = logp.gather(-1, seqs[:, 1:, None]).squeeze(-1)      # [B, len - 1]: log p(token t+1 | <= t)
        ce = -tgt_logp[:, : P - 1].mean()
        cand = mask[:, 1:]
        n_cand = int(cand.sum())
        if n_cand:
            p_cand = tgt_logp[cand].exp().clamp(max=1 - 1e-5)
            ul = -torch.log1p(-p_cand).mean()
        else:
            ul = torch.zeros((), device=device)
        loss = ce + a.ul_weight * ul
        lm = torch.zeros((), device=device)
        if a.lm_batch:
            starts = torch.randint(0, len(train_ids) - a.lm_window - 1, (a.lm_batch,)).tolist()
            win = torch.stack([train_ids[i: i + a.lm_window + 1] for i in starts]).to(device)
            with autocast():
                lm_logits = model(input_ids=win[:, :-1], use_cache=False).logits
            lm = F.cross_entropy(lm_logits.float().flatten(0, 1), win[:, 1:].flatten())
            loss = loss + lm
        if a.aux_loss > 0 and getattr(out, "aux_loss", None) is not None:
            loss = loss + a.aux_loss * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        step += 1
        window["cands"] += n_cand
        window["ce"] += ce.item()
        window["ul"] += ul.item()
        window["lm"] += lm.item()
        window["steps"] += 1
        now = time.time() - start
        if now - last_log >= a.log_every or step == 1:
            n = window["seqs"]
            row = {"step": step, "seconds": round(now, 1), "loop_share": round(window["loops"] / n, 3),
                   "ended_share": round(window["ended"] / n, 3), "candidates_per_seq": round(window["cands"] / n, 1),
                   "prompt_ce": round(window["ce"] / window["steps"], 4),
                   "ul": round(window["ul"] / window["steps"], 4), "lm_ce": round(window["lm"] / window["steps"], 4)}
            curve.append(row)
            log("  ".join(f"{k} {v}" for k, v in row.items()))
            window = dict.fromkeys(window, 0)
            last_log = now
    log(f"fine-tuned {step} steps in {time.time() - start:.0f} s")
    after = train_demo.heldout_loss(model, held, 4, autocast) if n_win else float("nan")
    log(f"held-out loss after: {after:.4f} (ppl {math.exp(after):.3f}); before {before:.4f}")
    train_demo.write_checkpoint(model, cfg, tok, Path(a.out), a.shard_mb)
    if a.log_json:
        Path(a.log_json).write_text(json.dumps({"steps": step, "heldout_loss_before": before,
                                                "heldout_loss_after": after, "curve": curve,
                                                "args": vars(a)}, indent=1) + "\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
