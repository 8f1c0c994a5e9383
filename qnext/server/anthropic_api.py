"""Anthropic adapter: /v1/messages (stream and not) and /v1/messages/count_tokens over serving.Backend.

Any `model` name is accepted (Claude Code asks for claude-* names, including a small model for background
tasks) and echoed back; the served checkpoint answers all of them.
Stream order: message_start, ping, then per content block content_block_start / *_delta... /
content_block_stop, then message_delta (stop_reason, usage), message_stop.
"""

from __future__ import annotations

import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from qnext.server import convert
from qnext.server.errors import APIError, anthropic_body, bad_request
from qnext.server.protocol import CountTokensRequest, MessagesRequest, ResponseFormat
from qnext.server.generation import Generation, until_disconnect
from qnext.server.serving import Backend
from qnext.server.sse import SSEResponse, sse_event
from qnext.server.tool_stream import ToolChoice, ToolStream, resolve_tool_choice

router = APIRouter()


def _prompt(b: Backend, body) -> tuple[list[int], ToolChoice]:
    """Prompt ids and tool choice. A final assistant message is a prefill: the generation prompt is followed by
    its text, and the answer holds only what comes after it (as Anthropic's API does)."""
    tools = convert.anthropic_tools(body.tools)
    single = body.tool_choice is not None and bool(body.tool_choice.disable_parallel_tool_use)
    choice = resolve_tool_choice(convert.anthropic_tool_choice(body.tool_choice), tools, "tool_choice", single)
    prefill = convert.anthropic_prefill(body.messages)
    messages = convert.anthropic_messages(body.system, body.messages[:-1] if prefill else body.messages)
    text = b.render_chat(messages, choice.template_tools) + prefill + choice.forced_prefix
    return b.encode(text), choice


def _output_format(output_config: dict | None) -> ResponseFormat | None:
    """Structured outputs: output_config.format {"type": "json_schema", "schema"} -> OpenAI's response_format."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request("output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}",
                          "output_config.format")
    return ResponseFormat(type="json_schema", json_schema={"schema": fmt["schema"]})


def _stream_error(e: APIError) -> str:
    return sse_event("error", anthropic_body(e.status, e.message))


def _stop(g: Generation, saw_call: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from the engine's finish."""
    if g.finish_reason == "length":
        return "max_tokens", None
    if saw_call:
        return "tool_use", None
    if isinstance(g.stop_reason, str):
        return "stop_sequence", g.stop_reason
    return "end_turn", None


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    ids, _ = _prompt(request.app.state.backend, body)
    return {"input_tokens": len(ids)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    b: Backend = request.app.state.backend
    prompt_ids, choice = _prompt(b, body)
    procs = [await b.grammars.tool_name(choice.names) if choice.constrain_name else None,
             await b.grammars.processor(_output_format(body.output_config))]
    params = b.sampling_params(len(prompt_ids), body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, stop=body.stop_sequences,
                               logits_processors=[p for p in procs if p is not None])
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    parser = ToolStream(choice, id_prefix="toolu_")
    model = body.model or b.model_name
    gen = await b.start(mid, prompt_ids, params)  # from here on nothing may raise before the response owns gen
    if body.stream:
        return SSEResponse(_stream(mid, model, gen, parser), _stream_error, [gen])
    return JSONResponse(await until_disconnect(_full(mid, model, gen, parser), request, [gen]))


async def _full(mid: str, model: str, gen: Generation, parser: ToolStream) -> dict:
    text = ""
    async for out in gen:
        text += out.delta_text
    content, calls = parser.parse_all(text)
    blocks = [{"type": "text", "text": content}] if content else []
    blocks += [c.to_anthropic() for c in calls]
    stop_reason, stop_seq = _stop(gen, bool(calls))
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_seq,
            "usage": {"input_tokens": gen.prompt_len, "output_tokens": gen.num_output_tokens}}


async def _stream(mid: str, model: str, gen: Generation, parser: ToolStream) -> AsyncIterator[str]:
    yield sse_event("message_start", {"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": gen.prompt_len, "output_tokens": 0}}})
    yield sse_event("ping", {"type": "ping"})
    index, open_kind, saw_call = -1, None, False

    def start(kind: str, block: dict) -> str:
        nonlocal index, open_kind
        index, open_kind = index + 1, kind
        return sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                 "content_block": block})

    def stop() -> str:
        nonlocal open_kind
        open_kind = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    async for out in gen:
        events = parser.feed(out.delta_text)
        if out.finish_reason is not None:
            events += parser.finish()
        for ev in events:
            if ev.kind == "text":
                if open_kind != "text":
                    if open_kind is not None:
                        yield stop()
                    yield start("text", {"type": "text", "text": ""})
                yield sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "text_delta", "text": ev.text}})
            elif ev.kind == "call":
                saw_call = True
                if open_kind is not None:
                    yield stop()
                yield start("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
            elif ev.kind == "args":
                yield sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "input_json_delta",
                                                                  "partial_json": ev.text}})
    if open_kind is not None:
        yield stop()
    stop_reason, stop_seq = _stop(gen, saw_call)
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": stop_seq},
                                      "usage": {"input_tokens": gen.prompt_len,
                                                "output_tokens": gen.num_output_tokens}})
    yield sse_event("message_stop", {"type": "message_stop"})
