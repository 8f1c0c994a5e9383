"""Qwen3-Coder tool calls: the model's XML -> typed calls, for whole texts and for streams.

This file: the call-level scanner (rules 1-3, 7 below). qnext/server/tool_call_body.py: one call's body ->
typed JSON arguments (rules 4-6) and the public data classes; qnext/server/tool_schema.py: tool schemas, typing
(convert_value) and tool_choice.

Public API
----------
parse_tool_calls(text, tools) -> (content: str | None, calls: list[ToolCall])
    Whole-text parse. Exactly `StreamingToolParser(tools)`, fed `text`, then finished.
StreamingToolParser(tools, id_prefix="call_")
    .feed(delta: str) -> list[StreamEvent]     (any split of the text: same result)
    .finish() -> list[StreamEvent]             (end of output; call once)
    .tool_calls: list[ToolCall]                (calls completed so far, in order)
    .content: str | None                       (all content emitted so far; None when empty)
StreamEvent(kind, text="", index=0, id="", name="", call=None), kind one of:
    "text"  content delta (text outside calls)                     -> text
    "call"  a call starts; its name is complete                     -> index, id, name
    "args"  a fragment of the call's JSON arguments                 -> index, text
    "end"   the call is complete                                    -> index, id, name, call (ToolCall)
    For each call, the "args" texts concatenated are exactly `call.arguments_json`.
ToolCall(id, name, arguments: dict, arguments_json: str)  (+ .to_openai(), .to_anthropic())
    arguments_json == json.dumps(arguments, ensure_ascii=False).
normalize_tools(tools) -> {name: parameters JSON schema}   OpenAI {"type":"function","function":{...}},
    Anthropic {"name", "input_schema"} or bare {"name", "parameters"} tool dicts; junk entries are skipped.
convert_value(text, schema, root=None) -> typed value      one parameter's typing rule (below); root: the
    tool's parameters schema, for local "$ref"s
validate_tool_choice(tool_choice, tools) -> (mode, name)   mode "auto" | "none" | "required" | "function";
    OpenAI ("auto", "none", "required", {"type": "function", "function": {"name"}}) and Anthropic
    ({"type": "auto" | "none" | "any" | "tool", "name"}) forms; ValueError with a clear message otherwise.
forced_tool_prefix(tool_choice, tools) -> str              "<tool_call>\\n<function=" for required / any,
    "<tool_call>\\n<function=NAME>\\n" for a named function, "" for auto / none / None. The server appends it
    after the generation prompt AND feeds it to the parser before the model's text (the parser must see it).

Format: `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>`.
Tags are exact and case-sensitive.

Rules (one engine serves both entry points, so whole-text and streaming results are identical by construction;
every decision waits for just enough text to be final, so the split of the input never matters)
1. Content. Text outside calls is content. A whitespace run (" \\t\\r\\n") directly before a call is dropped,
   and so is trailing whitespace at the end of an output that had a call. Everything else is kept verbatim,
   including text between and after calls. content is None when empty.
2. Openers. `<tool_call>` (anywhere) opens a call only when followed by at most 64 whitespace characters
   and a valid `<function=NAME>`; otherwise the `<tool_call>` text is content. A bare `<function=NAME>` (the
   model dropped `<tool_call>`) opens a call when it starts a line (text start, after "\\n", or right after a
   call) and, when tools are given, NAME is one of them; otherwise it is content. NAME: text up to `>`, at
   most 256 characters, without "\\n" or "<", stripped, non-empty. A wrapped call with an unknown NAME is
   kept, with untyped (string) arguments.
3. End of a call. Inside a call every `</function>` is only a candidate close: the call closes at the LAST
   `</function>` before the first structural `</tool_call>`, `<tool_call>` or `<function=`, or before the end
   of text. Structural: at a line start, or the first non-whitespace after the candidate. Precisely: after a
   candidate, the first of another `</function>` (anywhere) or a structural one of those three markers
   decides: another `</function>` makes the candidate value text (and becomes the new candidate); the others
   close the call at the candidate, as does the end of text. Text between the closing `</function>` and a
   `</tool_call>` is dropped (it is inside the wrapper); before `<tool_call>`, `<function=` or the end of text
   it is parsed as top-level text again. Without any `</function>`, a `</tool_call>` at a line start (or the
   end of text) closes the call. So values may hold `</function>`, `</parameter>`, and any tag mid-line; they
   cannot hold a line starting with `<parameter=NAME>` or `</tool_call>`, nor, after a `</function>`, a line
   starting with `<tool_call>` or `<function=`.
4. Parameters. In the call body, `<parameter=NAME>` (NAME as above) starts a parameter when it starts a line
   (directly after "\\n"); before the first parameter it may stand anywhere. A value's raw segment runs to the
   next such start or to the end of the body, so a missing `</parameter>` is harmless. From the segment:
   remove one final `</parameter>` followed only by whitespace, then one leading and one trailing newline
   ("\\n" or "\\r\\n"). Text before the first parameter is ignored, except that a body with no parameter whose
   text is a JSON object is taken as the arguments. A repeated parameter name keeps its first value (streamed
   JSON can never take a key back).
5. Typing (convert_value), with the tool's JSON schema for that parameter: undeclared parameter or unknown
   tool -> raw string; a schema without type information -> raw string. Types come from "type" (string or
   list), local "$ref"s, anyOf / oneOf / allOf members, else enum / const values; "nullable": true adds
   null. Unknown type names count as string. Then, v = value stripped of whitespace:
   - null/none (any case) -> None when the schema allows null, or when it has no string type at all;
   - only string types -> the raw value;
   - object / array -> JSON, then Python literal (ast.literal_eval), when the result is a dict / list
     matching the schema; integer -> int ("3", or integral "3.0"); number -> int when v is an integer literal,
     else float (int when integral and below 2**53; non-finite -> not a number); boolean -> "true"/"false"
     (any case); tried in that order, then the raw value (string types, or nothing matched).
6. Streaming arguments. The JSON is `json.dumps(arguments, ensure_ascii=False)` written left to right:
   `{"key": ` when a parameter's name is complete; a string-only parameter streams its escaped value as it
   arrives (holding back only a suffix that may still be stripped: a newline, `</parameter>` and what
   follows it, or a prefix of those; a nullable string also waits until it cannot be null/none); any other
   value is written when the parameter closes; `}` (or `{}`) when the call ends.
7. Content streaming holds back only what may still change meaning: a suffix that may start an opener (a
   prefix of `<tool_call>`, or of `<function=` at a line start), a trailing whitespace run (rule 1), and an
   opener waiting for its `<function=NAME>` to complete.
Malformed output degrades to content (or to a call with fewer arguments); nothing here raises on any text.
Cost: linear in the text for any feeding pattern, held stretches included (long whitespace runs, text after a
`</function>`, repeated `</function>`s), apart from C-speed copies of a held buffer; tests/test_tools.py checks.
"""

from __future__ import annotations

import uuid

from qnext.server.tool_call_body import (NEED, REJECT, CallBody, StreamEvent, ToolCall, find_marker,
                                         partial_start, read_name)
from qnext.server.tool_schema import (FUNCTION_CLOSE, FUNCTION_OPEN, NON_WS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, WS,
                                      convert_value, forced_tool_prefix, normalize_tools, validate_tool_choice)

__all__ = [
    "ToolCall",
    "StreamEvent",
    "StreamingToolParser",
    "parse_tool_calls",
    "normalize_tools",
    "convert_value",
    "validate_tool_choice",
    "forced_tool_prefix",
]

_MAX_GAP = 64  # whitespace allowed between <tool_call> and <function= (the model writes one "\n")


# --------------------------------------------------------------------------------------------------------
# The call-level scanner

_TOP, _BODY, _TENT = range(3)


class StreamingToolParser:
    """Incremental parser of one model output. feed() text deltas, then finish() once."""

    def __init__(self, tools: list[dict] | None = None, id_prefix: str = "call_"):
        self._schemas = normalize_tools(tools)
        self._id_prefix = id_prefix
        self._state = _TOP
        self._buf = ""          # _TOP / _BODY: undecided text
        self._bol = True        # _TOP: does _buf start a line?
        self._ws_known = 0      # _TOP: _buf[:_ws_known] is whitespace
        self._open_ws = 0       # _TOP: see _opener
        self._body_nl = False   # _BODY: is the last body text handed on a "\n"?
        self._call: CallBody | None = None
        # _TENT: text held from a candidate `</function>` (inclusive), kept as chunks so that holding a long
        # stretch costs linear time; _tdec: (position, marker) of the first decider, once seen.
        self._tchunks: list[str] = []
        self._tlen = 0
        self._ttail = ""
        self._tdec: tuple[int, str] | None = None
        self._tfirst: int | None = None  # H-position of the first non-whitespace after the candidate
        self._events: list[StreamEvent] = []
        self._content: list[str] = []
        self._finished = False
        self.tool_calls: list[ToolCall] = []

    # ---- public ---------------------------------------------------------------------------------------
    @property
    def content(self) -> str | None:
        return "".join(self._content) or None

    def feed(self, text: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if text:
            if self._state == _TENT:
                self._tent_add(text)
            else:
                self._buf += text
            self._run(eof=False)
        return self._take()

    def finish(self) -> list[StreamEvent]:
        if not self._finished:
            self._finished = True
            self._run(eof=True)
        return self._take()

    # ---- machinery ------------------------------------------------------------------------------------
    def _take(self) -> list[StreamEvent]:
        """Pending events, adjacent text / same-call args fragments merged."""
        out: list[StreamEvent] = []
        run: list[StreamEvent] = []  # consecutive mergeable events, joined once (linear)

        def flush() -> None:
            if run:
                out.append(run[0] if len(run) == 1 else
                           StreamEvent(run[0].kind, "".join(e.text for e in run), index=run[0].index))
                run.clear()

        for ev in self._events:  # cleared in place below: the open CallBody appends to this same list
            if run and not (ev.kind == run[0].kind and ev.index == run[0].index):
                flush()
            if ev.kind in ("text", "args"):
                run.append(ev)
            else:
                out.append(ev)
        flush()
        self._events.clear()
        return out

    def _run(self, eof: bool) -> None:
        step = {_TOP: self._top, _BODY: self._body, _TENT: self._tent}
        while step[self._state](eof):
            pass

    def _emit_text(self, t: str) -> None:
        if t:
            self._content.append(t)
            self._events.append(StreamEvent("text", t))

    def _opener(self, buf: str, at: int, wrapped: bool, eof: bool):
        """Verdict on the opener at buf[at]: (name, end of `<function=NAME>`), NEED or REJECT."""
        if wrapped:
            # _open_ws: where the whitespace after a <tool_call> held at _ws_known was scanned up to
            lo = at + len(TOOL_CALL_OPEN)
            m = NON_WS.search(buf, max(lo, self._open_ws) if at == self._ws_known else lo)
            k = m.start() if m else len(buf)
            self._open_ws = k
            if k - lo > _MAX_GAP:
                return REJECT
            head = buf[k:k + len(FUNCTION_OPEN)]
            if head != FUNCTION_OPEN:
                return NEED if not eof and FUNCTION_OPEN.startswith(head) else REJECT
            start = k + len(FUNCTION_OPEN)
        else:
            start = at + len(FUNCTION_OPEN)
        r = read_name(buf, start, eof)
        if isinstance(r, tuple) and not wrapped and self._schemas and r[0] not in self._schemas:
            return REJECT  # a bare opener must name a known tool: prose is not turned into calls
        return r

    def _top(self, eof: bool) -> bool:
        # _buf[:_ws_known] is known to be whitespace: no marker starts there and a held whitespace run is
        # not walked again per character (a long run of spaces stays linear to scan).
        buf, known = self._buf, self._ws_known
        pos = known

        def run_start(end: int) -> int:  # start of the whitespace run ending at `end`
            p = end
            while p > known and buf[p - 1] in WS:
                p -= 1
            return 0 if p == known else p

        while True:
            i = buf.find(TOOL_CALL_OPEN, pos)
            j = find_marker(buf, FUNCTION_OPEN, pos, True, self._bol, None if i == -1 else i)
            if i == -1 and j == -1:
                break
            wrapped = i != -1 and (j == -1 or i < j)
            at = i if wrapped else j
            v = self._opener(buf, at, wrapped, eof)
            if v is REJECT:
                pos = at + len(TOOL_CALL_OPEN if wrapped else FUNCTION_OPEN)
                continue
            cut = run_start(at)
            self._emit_text(buf[:cut])
            if v is NEED:
                if cut:
                    self._bol = buf[cut - 1] == "\n"
                self._buf, self._ws_known = buf[cut:], at - cut
                self._open_ws = self._open_ws - cut if wrapped else 0
                return False
            self._buf, self._ws_known, self._open_ws = buf[v[1]:], 0, 0
            self._start_call(v[0])
            return True
        if eof:
            cut = run_start(len(buf)) if self.tool_calls else len(buf)
            hold = cut
        else:
            hold = min(partial_start(buf, TOOL_CALL_OPEN, pos, False, False),
                       partial_start(buf, FUNCTION_OPEN, pos, True, self._bol))
            cut = run_start(hold)
        self._emit_text(buf[:cut])
        if cut:
            self._bol = buf[cut - 1] == "\n"
        self._buf, self._ws_known = ("", 0) if eof else (buf[cut:], hold - cut)
        self._open_ws = 0
        return False

    def _start_call(self, name: str) -> None:
        index = len(self.tool_calls)
        cid = f"{self._id_prefix}{uuid.uuid4().hex[:24]}"
        self._events.append(StreamEvent("call", index=index, id=cid, name=name))
        self._call = CallBody(index, cid, name, self._schemas.get(name), self._events)
        self._state, self._body_nl = _BODY, False

    def _deliver(self, t: str) -> None:
        if t:
            self._call.feed(t)
            self._body_nl = t[-1] == "\n"

    def _end_call(self, rest: str) -> None:
        index, call = self._call.index, self._call.finish()
        self._call = None
        self.tool_calls.append(call)
        self._events.append(StreamEvent("end", index=index, id=call.id, name=call.name, call=call))
        self._state, self._buf, self._bol, self._ws_known, self._open_ws = _TOP, rest, True, 0, 0

    def _body(self, eof: bool) -> bool:
        buf = self._buf
        i = buf.find(FUNCTION_CLOSE)
        j = find_marker(buf, TOOL_CALL_CLOSE, 0, True, self._body_nl)
        if i != -1 and (j == -1 or i < j):
            self._deliver(buf[:i])
            self._buf = ""
            self._tent_reset(buf[i:])
            return True
        if j != -1:
            self._deliver(buf[:j])
            self._end_call(buf[j + len(TOOL_CALL_CLOSE):])
            return True
        if eof:
            self._deliver(buf)
            self._end_call("")
            return True
        hold = min(partial_start(buf, FUNCTION_CLOSE, 0, False, False),
                   partial_start(buf, TOOL_CALL_CLOSE, 0, True, self._body_nl))
        self._deliver(buf[:hold])
        self._buf = buf[hold:]
        return False

    # _TENT: the held text H (chunks) starts with the candidate `</function>`; deciders are searched from
    # H[11:]. Positions in _tfirst / _tdec are positions in H.
    def _tent_reset(self, h: str) -> None:
        self._state = _TENT
        self._tchunks, self._tlen, self._ttail, self._tdec, self._tfirst = [], 0, "", None, None
        self._tent_add(h)

    def _tent_add(self, text: str) -> None:
        """Append text to H, moving the candidate over every later `</function>` (their body text goes to the
        call) until a closing decider is seen. Works on the window w = last 13 characters of H + text, with
        offsets, so long held stretches and many `</function>`s cost linear time."""
        if self._tdec is not None:  # decided already (the caller acts on it before feeding more)
            self._tchunks.append(text)
            self._tlen += len(text)
            return
        old_len, tail = self._tlen, self._ttail
        w = tail + text
        base = old_len - len(tail)    # H-position of w[0]
        cand = -base                  # w-position of the candidate
        # w-position of the first non-whitespace after the candidate (may be < 0: before w); None: not seen
        first = self._tfirst - base if self._tfirst is not None else None
        moved = False                 # has the candidate moved into w?
        dec = None
        while True:
            k = max(0, cand + len(FUNCTION_CLOSE))
            if first is None:
                m = NON_WS.search(w, k)
                first = m.start() if m else None

            def structural(j: int) -> bool:
                # At a line start, or the first non-whitespace after the candidate. A marker (<= 12
                # characters) reaching into `text` has its preceding character in w (13-character tail);
                # one lying wholly in the old tail was judged before, and j == 0 answers as it did then.
                return (j > 0 and w[j - 1] == "\n") or j == first

            f = w.find(FUNCTION_CLOSE, k)
            best = (f, FUNCTION_CLOSE) if f != -1 else None
            for marker in (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FUNCTION_OPEN):
                # only a marker starting before the best so far matters: keeps repeated searches bounded
                end = len(w) if best is None else min(len(w), best[0] + len(marker) - 1)
                j = w.find(marker, k, end)
                while j != -1 and not structural(j):
                    j = w.find(marker, j + 1, end)
                if j != -1 and (best is None or j < best[0]):
                    best = (j, marker)
            if best is None or best[1] != FUNCTION_CLOSE:
                dec = best
                break
            # another `</function>`: the candidate was value text; the body runs up to the new one
            pos = best[0]
            if not moved:
                held = "".join(self._tchunks)  # H before text; w[:len(tail)] is its end
                cut = base + pos               # H-position of the new candidate
                body = held[:cut] if cut <= len(held) else held + text[: cut - len(held)]
            else:
                body = w[cand:pos]
            self._deliver(body)
            cand, first, moved = pos, None, True
        if moved:
            rest = w[cand:]
            self._tchunks, self._tlen, self._ttail = [rest], len(rest), rest[-13:]
        else:  # w ends with H (all of H when H is shorter than the 13-character tail)
            self._tchunks.append(text)
            self._tlen, self._ttail = old_len + len(text), w[-13:]
        self._tfirst = first - cand if first is not None else None
        if dec is not None:
            self._tdec = (dec[0] - cand, dec[1])

    def _tent(self, eof: bool) -> bool:
        if self._tdec is None and not eof:
            return False
        h = "".join(self._tchunks)
        self._tchunks = []
        if self._tdec is not None and self._tdec[1] == TOOL_CALL_CLOSE:
            self._end_call(h[self._tdec[0] + len(TOOL_CALL_CLOSE):])  # what lay inside the wrapper is dropped
        else:  # <tool_call>, a bare <function=, or the end of text: re-read after the candidate as top level
            self._end_call(h[len(FUNCTION_CLOSE):])
        return True


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str | None, list[ToolCall]]:
    """Whole model output -> (content or None, calls). Same engine as the streaming parser."""
    parser = StreamingToolParser(tools)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.tool_calls

