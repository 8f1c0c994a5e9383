"""Qwen3-Coder tool calls, the inside of one call: its body text -> typed JSON argument events (CallBody), the
scanning helpers the call-level scanner in qnext/server/tools.py shares, and the public data (ToolCall,
StreamEvent). The rules (4-6) and the API are in tools.py's docstring."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qnext.server.tool_schema import (PARAMETER_CLOSE, PARAMETER_OPEN, WS, convert_value, null_step, param_schema,
                                      parse_container, schema_types)

MAX_NAME = 256
NEED = "need"      # verdict: more text is needed to decide
REJECT = "reject"  # verdict: not a tag; the marker is plain text


# --------------------------------------------------------------------------------------------------------
# Public data


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict
    arguments_json: str  # == json.dumps(arguments, ensure_ascii=False) == the concatenated "args" deltas

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}

    def to_anthropic(self) -> dict:
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": self.arguments}


@dataclass(frozen=True)
class StreamEvent:
    kind: str                    # "text" | "call" | "args" | "end"
    text: str = ""               # "text": content delta; "args": JSON fragment
    index: int = 0               # call index in this output ("call", "args", "end")
    id: str = ""                 # "call", "end"
    name: str = ""               # "call", "end"
    call: ToolCall | None = None  # "end"


# --------------------------------------------------------------------------------------------------------
# Scanning helpers (all positions are indices into one buffer)


def _at_bol(buf: str, p: int, bol0: bool) -> bool:
    """Is position p at a line start? bol0 says whether the buffer's start is."""
    return buf[p - 1] == "\n" if p > 0 else bol0


def find_marker(buf: str, marker: str, lo: int, need_bol: bool, bol0: bool, hi: int | None = None) -> int:
    """First marker starting in [lo, hi) (at a line start if need_bol), or -1."""
    end = len(buf) if hi is None else min(len(buf), hi + len(marker) - 1)
    i = buf.find(marker, lo, end)
    if need_bol:
        while i != -1 and not _at_bol(buf, i, bol0):
            i = buf.find(marker, i + 1, end)
    return i


def partial_start(buf: str, marker: str, lo: int, need_bol: bool, bol0: bool) -> int:
    """Smallest p >= lo where buf[p:] is a non-empty proper prefix of marker (at a line start if need_bol);
    len(buf) if none. Only the last len(marker)-1 characters are looked at."""
    n = len(buf)
    for k in range(min(len(marker) - 1, n - lo), 0, -1):
        p = n - k
        if marker.startswith(buf[p:]) and (not need_bol or _at_bol(buf, p, bol0)):
            return p
    return n


def read_name(buf: str, start: int, eof: bool):
    """`NAME>` at buf[start:] -> (name, end after '>'), NEED or REJECT."""
    stop = start + MAX_NAME + 1
    gt = buf.find(">", start, stop)
    seg = buf[start:gt] if gt != -1 else buf[start:stop]
    if "\n" in seg or "<" in seg:
        return REJECT
    if gt == -1:
        return REJECT if eof or len(seg) > MAX_NAME else NEED
    name = seg.strip()
    return (name, gt + 1) if name else REJECT


def _strip_value(raw: str) -> str:
    """A parameter's raw segment -> its text: one final `</parameter>` (then only whitespace) removed, then
    one leading and one trailing newline."""
    if raw.startswith("\r\n"):
        raw = raw[2:]
    elif raw.startswith("\n"):
        raw = raw[1:]
    return _strip_tail(raw)


def _strip_tail(r: str) -> str:
    j = len(r.rstrip(WS))
    if j >= len(PARAMETER_CLOSE) and r.startswith(PARAMETER_CLOSE, j - len(PARAMETER_CLOSE)):
        r = r[: j - len(PARAMETER_CLOSE)]
    if r.endswith("\r\n"):
        return r[:-2]
    if r.endswith("\n"):
        return r[:-1]
    return r


def _hold_start(r: str, j: int | None = None) -> int:
    """Smallest p such that r[p:] is a prefix of some suffix _strip_tail could remove, i.e. of
    L = (\\r?\\n)? </parameter> [ \\t\\r\\n]*  |  \\r?\\n.  r[:p] is final whatever follows.
    Minimality makes the result of (r + more) never fall below the result of r, so a caller may keep only
    the unemitted tail. j: start of r's trailing whitespace run, when the caller knows it."""
    n = len(r)
    if j is None:
        j = len(r.rstrip(WS))
    if j >= len(PARAMETER_CLOSE) and r.startswith(PARAMETER_CLOSE, j - len(PARAMETER_CLOSE)):
        p = j - len(PARAMETER_CLOSE)
    else:
        p = partial_start(r, PARAMETER_CLOSE, 0, False, False)
        if p == n:
            if r.endswith("\r\n"):
                return n - 2
            return n - 1 if r.endswith(("\n", "\r")) else n
    if p >= 2 and r.startswith("\r\n", p - 2):
        return p - 2
    return p - 1 if p >= 1 and r[p - 1] == "\n" else p


def _esc(s: str) -> str:
    """JSON string body of s; a per-character map, so escaping pieces == escaping the whole."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


# --------------------------------------------------------------------------------------------------------
# One parameter value

_STRING, _NSTRING, _DEFERRED, _SKIP = range(4)


def _value_mode(schema: dict | None, root: dict | None) -> int:
    """How a value streams; must agree with convert_value: _STRING/_NSTRING only when the result is always
    the raw text (or, for _NSTRING, None when the text is null/none)."""
    types = schema_types(schema, root) if schema is not None else set()
    if not types:
        return _STRING
    if types - {"null"} <= {"string"}:
        return _NSTRING if "null" in types else _STRING
    return _DEFERRED


class _Value:
    """Raw segment text of one parameter in, JSON fragments out (the key is written by the caller)."""

    def __init__(self, name: str, schema: dict | None, root: dict | None, mode: int):
        self.name, self.schema, self.root, self.mode = name, schema, root, mode
        self.raw: list[str] = []   # the whole segment: the final value is computed from it alone
        self.head = ""             # first characters until the leading-newline decision
        self.lead_done = False
        self.tail = ""             # text after the leading newline, not yet emitted (streaming modes)
        self.tail_ws = 0           # start of tail's trailing whitespace run (kept so long runs stay linear)
        self.sent = 0              # value characters already emitted
        self.opened = mode == _STRING  # has the opening quote been written?
        self.null_state: tuple[str, bool] | None = ("", False)  # _NSTRING before opening: can it be null?
        self.checked = 0           # _NSTRING before opening: tail characters already run through null_state

    def add(self, t: str) -> str:
        if self.mode == _SKIP:
            return ""
        self.raw.append(t)
        if self.mode == _DEFERRED:
            return ""
        if not self.lead_done:
            h = self.head + t
            if h == "\r":  # may still become "\r\n"
                self.head = h
                return ""
            self.head, self.lead_done = "", True
            t = h[2:] if h.startswith("\r\n") else h[1:] if h.startswith("\n") else h
        stripped = len(t.rstrip(WS))
        if stripped:
            self.tail_ws = len(self.tail) + stripped
        self.tail += t
        p = _hold_start(self.tail, self.tail_ws)
        prefix = ""
        if not self.opened:
            # tail[:p] is final and only grows, so each character goes through the automaton once
            state = self.null_state
            for c in self.tail[self.checked:p]:
                state = null_step(state, c)
                if state is None:
                    break
            self.null_state, self.checked = state, p
            if state is not None:
                return ""  # may still be null: wait
            self.opened, prefix = True, '"'
        out, self.tail = self.tail[:p], self.tail[p:]
        self.tail_ws = max(0, self.tail_ws - p)
        self.sent += len(out)
        return prefix + _esc(out)

    def close(self) -> tuple[str, Any]:
        if self.mode == _SKIP:
            return "", None
        text = _strip_value("".join(self.raw))
        value = convert_value(text, self.schema, self.root)
        if self.opened:  # a string whose head is already out; text[:sent] was emitted (see _hold_start)
            return _esc(text[self.sent:]) + '"', value
        return json.dumps(value, ensure_ascii=False), value


# --------------------------------------------------------------------------------------------------------
# One call's body -> arguments


class CallBody:
    """Body text of one call in (already cut by the call-level scanner), argument events out."""

    def __init__(self, index: int, cid: str, name: str, tool_schema: dict | None, out: list):
        self.index, self.id, self.name = index, cid, name
        self.tool_schema = tool_schema  # None: unknown tool, nothing typed
        self.out = out
        self.buf = ""        # undecided body text
        self.bol = False     # does buf start a line (is the last text handed on a "\n")?
        self.value: _Value | None = None
        self.junk: list[str] = []  # body text before the first parameter
        self.args: dict[str, Any] = {}
        self.keys: set[str] = set()  # parameter names seen (a repeat is skipped)

    def _emit(self, frag: str) -> None:
        if frag:
            self.out.append(StreamEvent("args", frag, index=self.index))

    def feed(self, text: str, eof: bool = False) -> None:
        buf, pos = self.buf + text, 0
        while True:
            in_value = self.value is not None
            i = find_marker(buf, PARAMETER_OPEN, pos, in_value, self.bol)
            if i == -1:
                break
            r = read_name(buf, i + len(PARAMETER_OPEN), eof)
            if r is REJECT:
                pos = i + len(PARAMETER_OPEN)
                continue
            self._text(buf[:i])
            if r is NEED:
                self.buf = buf[i:]
                return
            self._open(r[0])
            buf, pos = buf[r[1]:], 0
        cut = len(buf) if eof else partial_start(buf, PARAMETER_OPEN, pos, self.value is not None, self.bol)
        self._text(buf[:cut])
        self.buf = buf[cut:]

    def _text(self, t: str) -> None:
        if not t:
            return
        if self.value is None:
            self.junk.append(t)
        else:
            self._emit(self.value.add(t))
        self.bol = t[-1] == "\n"

    def _open(self, name: str) -> None:
        self._close_value()
        schema = param_schema(self.tool_schema, name)
        if name in self.keys:
            mode = _SKIP
        else:
            mode = _value_mode(schema, self.tool_schema)
            self._emit(("{" if not self.keys else ", ") + json.dumps(name, ensure_ascii=False) + ": "
                       + ('"' if mode == _STRING else ""))
            self.keys.add(name)
        self.value = _Value(name, schema, self.tool_schema, mode)
        self.bol = False

    def _close_value(self) -> None:
        v, self.value = self.value, None
        if v is None:
            return
        frag, value = v.close()
        if v.mode != _SKIP:
            self._emit(frag)
            self.args[v.name] = value

    def finish(self) -> ToolCall:
        self.feed("", eof=True)
        self._close_value()
        if self.keys:
            self._emit("}")
        else:
            obj = parse_container("".join(self.junk).strip(WS))
            if isinstance(obj, dict):  # the model wrote JSON arguments instead of parameters
                self.args = obj
            self._emit(json.dumps(self.args, ensure_ascii=False))
        return ToolCall(self.id, self.name, self.args, json.dumps(self.args, ensure_ascii=False))

