"""Tool calls between the protocols and the model's XML (the parsing itself is tools.py).

`resolve_tool_choice` decides what the template lists, what is parsed and what is forced; `ToolStream` turns
one choice's text deltas into tools.StreamEvents ("text" / "call" / "args") for either adapter.
Invariant: malformed model output degrades to text; a parser failure never fails the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from qnext.server import tools as tool_parser
from qnext.server.errors import bad_request

log = logging.getLogger("qnext.server")


@dataclass(frozen=True)
class ToolChoice:
    tools: list[dict]                  # OpenAI function tools of the request
    template_tools: list[dict] | None  # what the chat template lists (None: no tools section)
    parse: bool                        # parse <tool_call> blocks out of the output
    forced_prefix: str = ""            # appended after the generation prompt (required / named function)
    constrain_name: bool = False       # required: the model must complete the prefix with a tool's name
    single_call: bool = False          # parallel_tool_calls false / disable_parallel_tool_use: keep the first

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def resolve_tool_choice(tool_choice, tools: list[dict], param: str, single_call: bool = False) -> ToolChoice:
    """tool_choice in OpenAI or Anthropic form. "none" hides the tools from the template and parses nothing,
    so the model answers in text (earlier calls in the history still render)."""
    try:
        mode, _name = tool_parser.validate_tool_choice(tool_choice, tools)
        prefix = tool_parser.forced_tool_prefix(tool_choice, tools)
    except ValueError as e:
        raise bad_request(str(e), param) from None
    if not tools or mode == "none":
        return ToolChoice(tools, None, False)
    return ToolChoice(tools, tools, True, prefix, constrain_name=mode == "required", single_call=single_call)


class ToolStream:
    """One choice's output -> events. A forced prefix is fed first: the parser sees the call as the model's."""

    def __init__(self, choice: ToolChoice, id_prefix: str = "call_"):
        self.choice, self.id_prefix = choice, id_prefix
        self._parser = tool_parser.StreamingToolParser(choice.tools, id_prefix) if choice.parse else None
        self._pending = choice.forced_prefix

    def feed(self, delta: str) -> list[tool_parser.StreamEvent]:
        text, self._pending = self._pending + delta, ""
        if not text:
            return []
        if self._parser is None:
            return [tool_parser.StreamEvent("text", text)]
        try:
            return self._keep(self._parser.feed(text))
        except Exception:  # noqa: BLE001 - a parser bug must not fail the request: the rest passes as text
            log.exception("tool parser failed; passing the rest of the output through as text")
            self._parser = None
            return [tool_parser.StreamEvent("text", text)]

    def finish(self) -> list[tool_parser.StreamEvent]:
        events = self.feed("")
        if self._parser is None:
            return events
        try:
            return events + self._keep(self._parser.finish())
        except Exception:  # noqa: BLE001
            log.exception("tool parser failed at the end of the output")
            self._parser = None
            return events

    def _keep(self, events) -> list[tool_parser.StreamEvent]:
        limit = 1 if self.choice.single_call else None
        return [e for e in events if e.kind != "end" and (limit is None or e.kind == "text" or e.index < limit)]

    def parse_all(self, text: str) -> tuple[str, list[tool_parser.ToolCall]]:
        """Whole output -> (content, calls)."""
        full = self.choice.forced_prefix + text
        if not self.choice.parse:
            return full, []
        try:
            parser = tool_parser.StreamingToolParser(self.choice.tools, self.id_prefix)
            parser.feed(full)
            parser.finish()
        except Exception:  # noqa: BLE001
            log.exception("tool parser failed; answering the output as text")
            return full, []
        calls = parser.tool_calls[:1] if self.choice.single_call else parser.tool_calls
        return parser.content or "", calls
