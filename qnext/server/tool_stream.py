"""Tool calls between the protocols and the model's XML (parsing itself lives in tools.py).

`resolve_tool_choice` decides what the template sees and what is forced; `ToolStream` turns one choice's
text deltas into protocol-neutral events (text / call / args) for either adapter.
Invariant: malformed model output degrades to text; a parser failure never fails the request.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

try:  # DEV: until tools.py lands
    from qnext.server import tools as tool_parser
except ImportError:
    tool_parser = None
from qnext.server.errors import bad_request

log = logging.getLogger("qnext.server")


@dataclass(frozen=True)
class ToolChoice:
    tools: list[dict]                 # OpenAI function tools of the request
    template_tools: list[dict] | None  # what the chat template lists (None: no tools section)
    parse: bool                       # parse <tool_call> blocks out of the output
    forced_prefix: str = ""           # appended after the generation prompt (required / named function)


def resolve_tool_choice(tool_choice: str | dict | Any | None, tools: list[dict], param: str) -> ToolChoice:
    """tool_choice (OpenAI form: none / auto / required / {"type": "function", "function": {"name"}}).

    "none" hides the tools from the template (and parses nothing), so the model answers in text.
    """
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump()
    if not tools:
        if tool_choice in (None, "none", "auto"):
            return ToolChoice([], None, False)
        raise bad_request(f"{param} {_show(tool_choice)} needs a non-empty tools list", param)
    if tool_choice == "none":
        return ToolChoice(tools, None, False)
    if tool_choice in (None, "auto"):
        return ToolChoice(tools, tools, True)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"{param} names the function {name!r}, which is not among the tools", param)
    return ToolChoice(tools, tools, True, tool_parser.forced_tool_prefix(tool_choice, tools) or "")


def _show(tool_choice) -> str:
    return json.dumps(tool_choice) if isinstance(tool_choice, dict) else repr(tool_choice)


@dataclass
class Event:
    kind: str          # "text" | "call" (a call starts: id, name) | "args" (a fragment of its JSON arguments)
    text: str = ""
    index: int = 0     # call index within the choice
    id: str = ""
    name: str = ""


@dataclass
class Call:
    id: str
    name: str
    input: dict = field(default_factory=dict)

    @property
    def arguments(self) -> str:
        return json.dumps(self.input, ensure_ascii=False)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class ToolStream:
    """One choice's output -> events. With forced calls, the forced prefix is fed first: the parser sees the
    call as the model's own text."""

    def __init__(self, choice: ToolChoice, backend: Any = None, id_prefix: str = "call_"):
        self.choice, self.id_prefix = choice, id_prefix
        self._parser = tool_parser.StreamingToolParser(choice.tools) if choice.parse else None
        self._pending = choice.forced_prefix
        self._ids: dict[int, str] = {}

    # ---- streaming --------------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[Event]:
        text, self._pending = self._pending + delta, ""
        if not text:
            return []
        if self._parser is None:
            return [Event("text", text)]
        try:
            return self._map(self._parser.feed(text))
        except Exception:  # noqa: BLE001 - a parser bug must not fail the request: pass text through
            log.exception("tool parser failed; passing the rest through as text")
            self._parser = None
            return [Event("text", text)]

    def finish(self) -> list[Event]:
        events = self.feed("") if self._pending else []
        if self._parser is None:
            return events
        try:
            return events + self._map(self._parser.finish())
        except Exception:  # noqa: BLE001
            log.exception("tool parser failed at finish")
            self._parser = None
            return events

    def _map(self, events) -> list[Event]:
        out = []
        for ev in events:
            kind = ev.kind
            if kind == "text":
                if ev.text:
                    out.append(Event("text", ev.text))
            elif kind == "call":
                cid = self._ids.setdefault(ev.index, _new_id(self.id_prefix))
                out.append(Event("call", index=ev.index, id=cid, name=ev.name))
            elif kind == "args":
                if ev.text:
                    out.append(Event("args", ev.text, index=ev.index))
        return out

    # ---- whole text -------------------------------------------------------------------------------------
    def parse_all(self, text: str) -> tuple[str, list[Call]]:
        full = self.choice.forced_prefix + text
        if not self.choice.parse:
            return full, []
        try:
            content, calls = tool_parser.parse_tool_calls(full, self.choice.tools)
        except Exception:  # noqa: BLE001
            log.exception("tool parser failed; answering the output as text")
            return full, []
        return content, [Call(_new_id(self.id_prefix), c.name, dict(c.arguments)) for c in calls]
