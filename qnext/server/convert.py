"""OpenAI and Anthropic conversations -> the message shapes the checkpoint's chat template expects.

Template shapes (what Qwen3-Coder's template reads):
  {"role": "system" | "user", "content": str}
  {"role": "assistant", "content": str, "tool_calls": [{"type": "function", "id": str,
                                                        "function": {"name": str, "arguments": dict}}]}
  {"role": "tool", "content": str, "tool_call_id": str}   (consecutive ones share one user turn)
Tools are OpenAI function tools: {"type": "function", "function": {"name", "description", "parameters"}}.
The model reads text only: image, audio and document parts are a 400, never silently dropped; the one
exception is an image inside an Anthropic tool_result (an agent's tool read a picture), which becomes a short
text note so that the agent's session goes on.
"""

from __future__ import annotations

import json
from typing import Any

from qnext.server.errors import bad_request
from qnext.server.protocol import AnthropicTool, AnthropicToolChoice, ChatMessage, Tool

# Claude Code's first system block carries a per-request billing hash (`cch=...`); it holds no instruction for
# the model and, left in, changes the prompt's first tokens on every request, so no prefix cache could ever hit.
_VOLATILE_SYSTEM_PREFIXES = ("x-anthropic-billing-header:",)


IMAGE_NOTE = "[image omitted: this model reads text only]"


def _text_parts(parts: list[dict[str, Any]], param: str, sep: str = "\n", images_as_note: bool = False) -> str:
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image" and images_as_note:
            texts.append(IMAGE_NOTE)
        elif kind in ("thinking", "redacted_thinking"):
            continue  # an earlier turn's reasoning: not part of Coder-Next's format
        else:
            raise bad_request(f"{param}[{i}]: content of type {kind!r} is not supported (text only)", f"{param}[{i}]")
    return sep.join(texts)


def _content(content: str | list[dict[str, Any]] | None, param: str) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else _text_parts(content, param)


def _arguments(args: str | dict[str, Any], param: str) -> dict[str, Any]:
    if isinstance(args, dict):
        return args
    try:
        value = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError as e:
        raise bad_request(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param} must encode a JSON object", param)
    return value


# ---- OpenAI ----------------------------------------------------------------------------------------------
def openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        text = _content(m.content, f"{p}.content")
        if m.role in ("system", "developer"):
            out.append({"role": "system", "content": text})
        elif m.role == "user":
            out.append({"role": "user", "content": text})
        elif m.role in ("tool", "function"):
            out.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id or m.name or ""})
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"type": "function", "id": tc.id or f"call_{i}_{j}",
                     "function": {"name": tc.function.name,
                                  "arguments": _arguments(tc.function.arguments,
                                                          f"{p}.tool_calls[{j}].function.arguments")}}
                    for j, tc in enumerate(m.tool_calls)]
            out.append(msg)
    return out


def openai_tools(tools: list[Tool] | None) -> list[dict[str, Any]]:
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools or []]


# ---- Anthropic -------------------------------------------------------------------------------------------
def anthropic_system(system: str | list[dict[str, Any]] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    blocks = [b for b in system
              if not (b.get("type") == "text" and str(b.get("text", "")).startswith(_VOLATILE_SYSTEM_PREFIXES))]
    return _text_parts(blocks, "system")


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = _text_parts(content, f"{param}.content", images_as_note=True)
    else:
        raise bad_request(f"{param}.content must be a string or a list of blocks", f"{param}.content")
    if block.get("is_error"):
        text = f"Error: {text}"  # the template has no error flag; the model reads it from the text
    return {"role": "tool", "content": text, "tool_call_id": str(block.get("tool_use_id", ""))}


def anthropic_prefill(messages) -> str:
    """Text of a final assistant message without tool calls: the answer must continue it (Anthropic prefill)."""
    last = messages[-1]
    if last.role != "assistant":
        return ""
    blocks = [{"type": "text", "text": last.content}] if isinstance(last.content, str) else last.content
    if any(b.get("type") != "text" for b in blocks):
        return ""
    return "".join(b.get("text", "") for b in blocks)


def anthropic_messages(system: str | list[dict[str, Any]] | None, messages) -> list[dict[str, Any]]:
    """Template messages; a prefill (see anthropic_prefill) is the caller's to cut and append."""
    out: list[dict[str, Any]] = []
    sys_text = anthropic_system(system)
    if sys_text:
        out.append({"role": "system", "content": sys_text})
    for i, m in enumerate(messages):
        p = f"messages[{i}].content"
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(blocks):
            kind = b.get("type")
            if kind == "tool_result" and m.role == "user":
                out.append(_tool_result(b, f"{p}[{j}]"))  # results precede the user's text of the same turn
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise bad_request(f"{p}[{j}]: tool_use needs a string name and an object input", f"{p}[{j}]")
                calls.append({"type": "function", "id": str(b.get("id", f"toolu_{i}_{j}")),
                              "function": {"name": b["name"], "arguments": b.get("input") or {}}})
            else:
                texts.append(_text_parts([b], p))
        text = "".join(texts) if m.role == "assistant" else "\n".join(t for t in texts if t)
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif text or not blocks or all(b.get("type") != "tool_result" for b in blocks):
            out.append({"role": "user", "content": text})
    return out


def anthropic_tools(tools: list[AnthropicTool] | None) -> list[dict[str, Any]]:
    """Custom tools only: server tools (web_search, computer, ...) have no schema the model could fill."""
    out = []
    for t in tools or []:
        if t.type not in (None, "custom") and t.input_schema is None:
            continue
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema or {"type": "object", "properties": {}}}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out


def anthropic_tool_choice(tc: AnthropicToolChoice | None) -> str | dict[str, Any] | None:
    """Anthropic tool_choice -> OpenAI's: auto, none, any -> required, tool -> named function."""
    if tc is None:
        return None
    if tc.type == "tool":
        if not tc.name:
            raise bad_request("tool_choice.name is required when tool_choice.type is 'tool'", "tool_choice.name")
        return {"type": "function", "function": {"name": tc.name}}
    return {"auto": "auto", "none": "none", "any": "required"}[tc.type]
