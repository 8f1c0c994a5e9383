"""Greedy completion of held-out function headers: the share of completions that parse with `ast`.

Prompt: the file's source before the function (its last whole lines within `context_chars`) and the header
(decorators, `def ...:` and docstring, as in qnext/eval/heldout.py), in the file's own indentation; with
context_chars=0, the header alone, dedented to column 0. The model writes greedily (temperature 0) until the body
ends: the first non-blank line indented no deeper than the `def` (seen as soon as that line's first character is
generated; a logits processor then forces <|endoftext|>), an end-of-sequence token, or max_tokens.

A completion counts as parsed when the body ended within max_tokens, holds at least one line of code (not only
blank lines or comments), and header + body, dedented by the `def`'s indentation, parse with `ast.parse`.
`parsed_lenient` also counts a body cut by max_tokens when its whole lines parse (typically a loop repeating a
valid line); it is reported beside the strict figure, never instead of it.
"""

from __future__ import annotations

import ast
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qnext.eval.heldout import dedent, heldout_headers, tail_lines

END_TOKEN = "<|endoftext|>"


def load_headers(path: str | Path | None = None, num: int | None = None) -> list[dict]:
    """Header records from a heldout_headers.jsonl (scripts/build_corpus.py), or, without a path, from the running
    interpreter's held-out stdlib files; the first `num` of them."""
    if path is None:
        rows = heldout_headers()
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows[:num] if num is not None else rows


def build_prompt(rec: dict, context_chars: int) -> tuple[str, int]:
    """(prompt, indent the body must stay deeper than)."""
    if context_chars <= 0:
        return dedent(rec["header"], rec["indent"]), 0
    return tail_lines(rec["context"], context_chars) + rec["header"], rec["indent"]


def _column(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cut_body(completion: str, indent: int) -> tuple[str, bool]:
    """(body, ended): the completion up to the first non-blank line indented <= indent (that line excluded), and
    whether such a line was seen. The completion starts at the beginning of a line (prompts end in a newline)."""
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        if line.strip() and _column(line) <= indent:
            return "".join(ln + "\n" for ln in lines[:i]), True
    return completion, False


def body_parses(header: str, body: str, indent: int) -> bool:
    """True when body has a line of code and header + body (dedented by indent) parse."""
    if not any(ln.strip() and not ln.strip().startswith("#") for ln in body.split("\n")):
        return False
    try:
        ast.parse(dedent(header + body, indent))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


class BodyEndStop:
    """Logits processor: once the generated text shows the body has ended (cut_body), only `end_id` may follow."""

    def __init__(self, tokenizer, indent: int, end_id: int):
        self.tokenizer, self.indent, self.end_id = tokenizer, indent, end_id

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_token_ids:
            return logits
        text = self.tokenizer.decode(list(output_token_ids), skip_special_tokens=False)
        if cut_body(text, self.indent)[1]:
            forced = torch.full_like(logits, float("-inf"))
            forced[self.end_id] = 0.0
            return forced
        return logits


@dataclass
class CompleteResult:
    examples: int = 0
    parsed: int = 0
    parsed_lenient: int = 0      # parsed, or cut by max_tokens with whole lines that parse
    ended: int = 0               # bodies that ended within max_tokens
    generated_tokens: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)  # per example: file, line, name, completion, ended, parsed

    @property
    def parse_rate(self) -> float:
        return self.parsed / self.examples if self.examples else 0.0

    @property
    def lenient_rate(self) -> float:
        return self.parsed_lenient / self.examples if self.examples else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")


def complete(llm, records: list[dict], *, max_tokens: int = 256, context_chars: int = 2000) -> CompleteResult:
    """Greedy body completion of each header record through the offline LLM API (see module doc)."""
    from qnext.sampling_params import SamplingParams

    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("eval complete needs a checkpoint with a tokenizer")
    end_id = tok.token_to_id(END_TOKEN)
    if end_id is None:
        raise ValueError(f"the tokenizer has no {END_TOKEN} token")
    prompts, params, indents = [], [], []
    for rec in records:
        prompt, indent = build_prompt(rec, context_chars)
        prompts.append(prompt)
        indents.append(indent)
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=True,
                                     logits_processors=[BodyEndStop(tok, indent, end_id)]))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = CompleteResult(seconds=time.perf_counter() - t0)
    for rec, indent, out in zip(records, indents, outs):
        c = out.outputs[0]
        body, ended = cut_body(c.text, indent)
        ended = ended or c.finish_reason == "stop"  # an end-of-sequence token also ends the body
        header = rec["header"] if indent else dedent(rec["header"], rec["indent"])
        ok = ended and body_parses(header, body, indent)
        whole_lines = body if ended else body[: body.rfind("\n") + 1]
        result.examples += 1
        result.parsed += ok
        result.parsed_lenient += ok or (not ended and body_parses(header, whole_lines, indent))
        result.ended += ended
        result.generated_tokens += len(c.token_ids)
        result.rows.append({"file": rec["file"], "line": rec["line"], "name": rec["name"], "ended": ended,
                            "parsed": ok, "completion": body})
    return result
