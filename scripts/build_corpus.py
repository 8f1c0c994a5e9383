#!/usr/bin/env python3
"""Build the demo model's training corpus from Python source that every machine has.

Sources, in this order:
  stdlib  the running interpreter's standard library (sysconfig "stdlib"), its test suite included when installed;
  site    with --site-packages: the interpreter's site-packages (purelib/platlib), for more data.
A file is kept when it decodes as UTF-8, parses with `ast` under the running Python, is at most --max-file-kb
and does not look generated (very long lines). Files with identical content are kept once.

Held-out split (qnext/eval/heldout.py, shared with `qnext eval`): a stdlib file is held out when
sha1("stdlib/" + its relative path) falls in the first --heldout-permille of 1000 buckets (about 3%), so the split
is the same on every machine and Python version.
A train file is dropped when at least 30% of its long lines (>= 24 characters, stripped) also occur in held-out
files: this catches copies of a held-out file under another path (a module moved between Python versions, a
vendored copy or backport in site-packages).

Outputs in --out:
  train.txt, heldout.txt     documents separated by a line holding only <|endoftext|>
  heldout_files.txt          relative paths of the held-out files
  heldout_headers.jsonl      prompts for `qnext eval complete`: one per held-out function (qnext/eval/heldout.py)
  chat.jsonl                 chat pairs made from train-file functions with docstrings (user asks, assistant
                             answers with the function in a ```python block), for the demo's chat behaviour
  stats.json
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's qnext, installed or not
from qnext.eval.heldout import (MAX_FUNC_LINES, dedent_lines, file_headers, func_span, functions,  # noqa: E402
                                has_docstring, is_heldout, list_py, read_source, sha1_int, sort_headers)

DOC_SEP = "<|endoftext|>"
CHAT_TEMPLATES = (
    "Write a Python {kind} `{name}({args})` that does this: {summary}",
    "Implement `{name}` in Python. {summary}",
    "{summary} Write it as a Python {kind} named `{name}`.",
    "Can you write `{name}({args})`? {summary}",
)


@dataclass
class FileResult:
    key: str
    text: str
    headers: list[dict] = field(default_factory=list)
    chats: list[dict] = field(default_factory=list)


def _extract_chat(node, lines: list[str]) -> dict | None:
    if not has_docstring(node):
        return None
    start, end = func_span(node)
    if end - start + 1 > MAX_FUNC_LINES or len(node.body) < 2:
        return None
    summary = " ".join(ast.get_docstring(node).split("\n\n")[0].split())
    if not (15 <= len(summary) <= 300) or not any(c.isalpha() for c in summary):
        return None
    args = [a.arg for a in node.args.posonlyargs + node.args.args]
    kind = "method" if args and args[0] in ("self", "cls") else "function"
    source = "\n".join(dedent_lines(lines[start - 1:end], node.col_offset)) + "\n"
    h = sha1_int(f"{node.name}:{start}")
    user = CHAT_TEMPLATES[h % len(CHAT_TEMPLATES)].format(
        kind=kind, name=node.name, args=", ".join(args), summary=summary[0].upper() + summary[1:])
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": f"```python\n{source}```"}]}


_HELDOUT_LINES: frozenset[str] = frozenset()
LEAK_MIN_LINE, LEAK_SHARE = 24, 0.3


def _long_lines(text: str) -> list[str]:
    return [s for s in (ln.strip() for ln in text.split("\n")) if len(s) >= LEAK_MIN_LINE]


def _init_worker(heldout_lines: frozenset[str]) -> None:
    global _HELDOUT_LINES
    _HELDOUT_LINES = heldout_lines


def _leaks(text: str) -> bool:
    lines = _long_lines(text)
    shared = sum(ln in _HELDOUT_LINES for ln in lines)
    return shared >= 3 and shared >= LEAK_SHARE * len(lines)


def _process(job: tuple[str, str, bool, int]) -> FileResult | str | None:
    """None: unreadable, unparsable or generated; "leak": a train file too close to held-out files."""
    key, path, heldout, max_bytes = job
    src = read_source(Path(path), max_bytes)
    if src is None:
        return None
    text, tree = src
    if not heldout and _leaks(text):
        return "leak"
    if heldout:
        return FileResult(key, text, headers=file_headers(key, text, tree))
    lines = text.split("\n")
    chats = [c for c in (_extract_chat(node, lines) for node in functions(tree)) if c is not None]
    for c in chats:
        c["file"] = key
    return FileResult(key, text, chats=chats)


def collect(heldout_permille: int = 30, site_packages: bool = False, skip_tests: bool = False,
            max_file_kb: int = 256, max_mb: float = 0.0, workers: int | None = None) -> dict:
    """Returns {"train": [(key, text)], "heldout": [(key, text)], "headers": [...], "chats": [...], "stats": {...}}."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    jobs = []
    for p in list_py(stdlib, skip_tests):
        key = "stdlib/" + p.relative_to(stdlib).as_posix()
        jobs.append((key, str(p), is_heldout(key, heldout_permille), max_file_kb * 1024))
    if site_packages:
        roots = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
        site_jobs = []
        for root in roots:
            for p in list_py(Path(root), skip_tests):
                key = "site/" + p.relative_to(root).as_posix()
                site_jobs.append((key, str(p), False, max_file_kb * 1024))
        site_jobs.sort(key=lambda j: sha1_int(j[0]))  # a fixed random order, so --max-mb takes a fair sample
        if max_mb > 0:  # read and parse no more than the budget can use (with room for files dropped)
            keep, size = [], 0
            for j in site_jobs:
                if size > 1.5 * max_mb * 1e6:
                    break
                keep.append(j)
                size += os.path.getsize(j[1])
            site_jobs = keep
        jobs.extend(site_jobs)
    held_jobs = [j for j in jobs if j[2]]
    train_jobs = [j for j in jobs if not j[2]]
    with Pool(workers or os.cpu_count() or 1) as pool:
        held_results = pool.map(_process, held_jobs, chunksize=4)
    heldout_lines = frozenset(ln for r in held_results if r is not None for ln in _long_lines(r.text))
    with Pool(workers or os.cpu_count() or 1, initializer=_init_worker, initargs=(heldout_lines,)) as pool:
        train_results = pool.map(_process, train_jobs, chunksize=16)

    seen: dict[str, str] = {}
    heldout, train, headers, chats = [], [], [], []
    budget = max_mb * 1e6 if max_mb > 0 else float("inf")
    used = 0
    skipped = {"unreadable_or_generated": 0, "duplicate": 0, "leak_guard": 0, "over_budget": 0}
    # held-out files first, so a train copy of a held-out file is the one dropped
    for job, res in zip(held_jobs + train_jobs, held_results + train_results):
        if res == "leak":
            skipped["leak_guard"] += 1
            continue
        if res is None:
            skipped["unreadable_or_generated"] += 1
            continue
        digest = hashlib.sha1(res.text.encode()).hexdigest()
        if digest in seen:
            skipped["duplicate"] += 1
            continue
        if job[2]:
            seen[digest] = res.key
            heldout.append((res.key, res.text))
            headers.extend(res.headers)
            continue
        if used + len(res.text) > budget:  # the budget is full: keep nothing after this file
            skipped["over_budget"] += 1
            budget = used
            continue
        seen[digest] = res.key
        used += len(res.text)
        train.append((res.key, res.text))
        chats.extend(res.chats)
    headers = sort_headers(headers)
    chats.sort(key=lambda c: sha1_int(c["messages"][0]["content"]))
    stats = {
        "python": sys.version.split()[0], "stdlib": str(stdlib), "site_packages": site_packages,
        "train_files": len(train), "train_chars": sum(len(t) for _, t in train),
        "heldout_files": len(heldout), "heldout_chars": sum(len(t) for _, t in heldout),
        "heldout_headers": len(headers), "chat_pairs": len(chats), "skipped": skipped,
    }
    return {"train": train, "heldout": heldout, "headers": headers, "chats": chats, "stats": stats}


def write_docs(path: Path, docs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (_, text) in enumerate(docs):
            if i:
                f.write(f"\n{DOC_SEP}\n")
            f.write(text)


def read_docs(path: str | Path) -> list[str]:
    """Documents of a corpus file, gzipped or not (split at lines holding only <|endoftext|>); a plain file is one
    document."""
    if str(path).endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = Path(path).read_text(encoding="utf-8")
    return [d for d in text.split(f"\n{DOC_SEP}\n") if d.strip()]


def write_corpus(out: Path, corpus: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_docs(out / "train.txt", corpus["train"])
    write_docs(out / "heldout.txt", corpus["heldout"])
    (out / "heldout_files.txt").write_text("".join(k + "\n" for k, _ in corpus["heldout"]))
    for name, rows in (("heldout_headers.jsonl", corpus["headers"]), ("chat.jsonl", corpus["chats"])):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    (out / "stats.json").write_text(json.dumps(corpus["stats"], indent=1) + "\n")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heldout-permille", type=int, default=30, help="share of stdlib files held out, per 1000")
    p.add_argument("--site-packages", action="store_true", help="add the interpreter's site-packages to train")
    p.add_argument("--skip-tests", action="store_true", help="leave out test/ and tests/ folders")
    p.add_argument("--max-file-kb", type=int, default=256)
    p.add_argument("--max-mb", type=float, default=0.0, help="cap on train text in MB (0 = none)")
    p.add_argument("--workers", type=int, default=None)


def collect_from_args(args: argparse.Namespace) -> dict:
    return collect(args.heldout_permille, args.site_packages, args.skip_tests, args.max_file_kb, args.max_mb,
                   args.workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    add_args(p)
    args = p.parse_args(argv)
    corpus = collect_from_args(args)
    write_corpus(Path(args.out), corpus)
    print(json.dumps(corpus["stats"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
