"""The demo model's held-out set: which standard-library files are kept out of training, and the function
headers that `qnext eval complete` asks the model to finish. scripts/build_corpus.py uses the same rules.

Split: a file of the running interpreter's standard library is held out when sha1("stdlib/" + its path relative
to the stdlib folder) falls in the first HELDOUT_PERMILLE of 1000 buckets (about 3%): the same files on every
machine and Python version.

Header: a function (top-level, method or nested) of a held-out file whose body has at least one statement after
its docstring and which spans at most MAX_FUNC_LINES lines. Its record: `header`, the source from its first
decorator through the `def ...:` line(s) and, when present, the docstring, in the file's own indentation, ending
in a newline; `indent`, the column of its `def`; `context`, the whole lines of the file before it (at most the
last MAX_CONTEXT_CHARS characters); `reference`, the rest of the body as written. Headers are ordered by sha1 of
"path:line", so any prefix of the list is a fixed random sample.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from pathlib import Path

HELDOUT_PERMILLE = 30
MAX_FILE_BYTES = 256 * 1024
MAX_FUNC_LINES = 40
MAX_CONTEXT_CHARS = 4000
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


def sha1_int(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def is_heldout(key: str, permille: int = HELDOUT_PERMILLE) -> bool:
    """key is "stdlib/<relative path>"; about permille/1000 of the keys are held out."""
    return sha1_int(key) % 1000 < permille


def list_py(root: Path, skip_tests: bool = False) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".dist-info")
                             and not (skip_tests and d in ("test", "tests")))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def heldout_stdlib_files(permille: int = HELDOUT_PERMILLE) -> list[tuple[str, Path]]:
    """(key, path) of the running interpreter's held-out stdlib files."""
    root = stdlib_root()
    keyed = (("stdlib/" + p.relative_to(root).as_posix(), p) for p in list_py(root))
    return [(k, p) for k, p in keyed if is_heldout(k, permille)]


def looks_generated(text: str, name: str) -> bool:
    """Generated code or data tables rather than code people write (protobuf modules, very long lines)."""
    if name.endswith("_pb2.py"):
        return True
    lines = text.split("\n")
    long_lines = sum(len(ln) > 200 for ln in lines)
    return max(map(len, lines)) > 2000 or long_lines > 0.02 * len(lines) or len(text) / max(len(lines), 1) > 80


def read_source(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[str, ast.AST] | None:
    """(text, tree) of a Python file worth using: at most max_bytes, UTF-8, parses under this Python, not
    generated, no <|endoftext|> in it (the document separator). None otherwise."""
    try:
        raw = Path(path).read_bytes()
        if len(raw) > max_bytes or not raw.strip():
            return None
        text = raw.decode("utf-8").replace("\r\n", "\n")
        if "<|endoftext|>" in text or looks_generated(text, str(path)):
            return None
        return text, ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def dedent_lines(lines: list[str], indent: int) -> list[str]:
    """Drop `indent` leading columns of each line (a line indented less loses its leading whitespace)."""
    return [ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in lines]


def dedent(text: str, indent: int) -> str:
    return "\n".join(dedent_lines(text.split("\n"), indent)) if indent else text


def tail_lines(text: str, max_chars: int) -> str:
    """The last whole lines of `text` that fit in max_chars."""
    if len(text) <= max_chars:
        return text
    if max_chars <= 0:
        return ""
    cut = text.find("\n", len(text) - max_chars - 1)
    return text[cut + 1:] if cut >= 0 else ""


def func_span(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    """1-based first line (decorators included) and last line."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return start, node.end_lineno or node.lineno


def has_docstring(node) -> bool:
    b0 = node.body[0]
    return isinstance(b0, ast.Expr) and isinstance(b0.value, ast.Constant) and isinstance(b0.value.value, str)


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def header_record(node, lines: list[str]) -> dict | None:
    """The header record of one function (see module doc), or None when it does not qualify."""
    start, end = func_span(node)
    if end - start + 1 > MAX_FUNC_LINES:
        return None
    doc = has_docstring(node)
    rest = node.body[1:] if doc else node.body
    if not rest or node.body[0].lineno == node.lineno:  # one-line def, or no statement to write
        return None
    prompt_end = node.body[0].end_lineno if doc else rest[0].lineno - 1
    if rest[0].lineno <= prompt_end:  # docstring and a statement on one line
        return None
    indent = node.col_offset
    header = "\n".join(lines[start - 1:prompt_end]) + "\n"
    reference = "\n".join(lines[prompt_end:end]) + "\n"
    try:
        ast.parse(dedent(header + reference, indent))
    except SyntaxError:
        return None
    context = "\n".join(lines[:start - 1]) + "\n" if start > 1 else ""
    return {"name": node.name, "line": start, "indent": indent, "header": header, "reference": reference,
            "context": tail_lines(context, MAX_CONTEXT_CHARS)}


def file_headers(key: str, text: str, tree: ast.AST | None = None) -> list[dict]:
    lines = text.split("\n")
    tree = tree if tree is not None else ast.parse(text)
    out = []
    for node in functions(tree):
        rec = header_record(node, lines)
        if rec is not None:
            rec["file"] = key
            out.append(rec)
    return out


def sort_headers(headers: list[dict]) -> list[dict]:
    return sorted(headers, key=lambda h: sha1_int(f"{h['file']}:{h['line']}"))


def heldout_headers(permille: int = HELDOUT_PERMILLE) -> list[dict]:
    """Header records of the running interpreter's held-out stdlib files (those read_source accepts), in their
    fixed random order: what scripts/build_corpus.py writes to heldout_headers.jsonl."""
    headers = []
    for key, path in heldout_stdlib_files(permille):
        src = read_source(path)
        if src is not None:
            headers.extend(file_headers(key, *src))
    return sort_headers(headers)
