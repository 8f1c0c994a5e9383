"""OpenAI adapter: /v1/chat/completions and /v1/completions over the one engine API (serving.Backend)."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from qnext.sampling_params import SamplingParams
from qnext.server import convert
from qnext.server.errors import APIError, bad_request, openai_body
from qnext.server.generation import Generation, merge, until_disconnect
from qnext.server.protocol import ChatCompletionRequest, CompletionRequest
from qnext.server.serving import MAX_N, Backend
from qnext.server.sse import SSEResponse, sse_data
from qnext.server.tool_stream import ToolChoice, ToolStream, resolve_tool_choice

router = APIRouter()


def _stream_error(e: APIError) -> str:
    return sse_data(openai_body(e.status, e.message, e.param, e.code)) + "data: [DONE]\n\n"


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _finish(reason: str | None) -> str:
    return {"abort": "stop", None: "stop"}.get(reason, reason)


# ---- parameters ------------------------------------------------------------------------------------------
async def _params(b: Backend, body, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                  choice: ToolChoice | None = None, prompt_logprobs: int | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice; n > 1 gets seeds seed, seed+1, ... (unseeded stays unseeded).
    Each choice gets its own grammar processors (they are stateful); the logit bias is shared (stateless)."""
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {body.n}", "n")
    if body.stop_token_ids:
        b.check_token_ids(body.stop_token_ids, "stop_token_ids")
    bias = b.logit_bias(body.logit_bias)
    out = []
    for i in range(body.n):
        name = await b.grammars.tool_name(choice.names) if choice is not None and choice.constrain_name else None
        procs = [p for p in (await b.grammars.processor(body.response_format), name, bias) if p is not None]
        out.append(b.sampling_params(
            prompt_len, max_tokens, "prompt" if isinstance(body, CompletionRequest) else "messages",
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, seed=None if body.seed is None else body.seed + i,
            stop=body.stop, stop_token_ids=body.stop_token_ids, min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens, logits_processors=procs))
    return out


def _usage(prompt_len: int, gens: list[Generation]) -> dict:
    completion = sum(g.num_output_tokens for g in gens)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


# ---- logprobs --------------------------------------------------------------------------------------------
def _token_entries(b: Backend, out, top_n: int) -> list[tuple[tuple[str, list[int]], float, list]]:
    """((text, bytes), logprob, [((text, bytes), logprob)] of the top_n) for each token of this delta."""
    return _entries(b, out.delta_token_ids, out.delta_logprobs or [], top_n)


def _entries(b: Backend, ids: list[int], lps: list, top_n: int) -> list[tuple]:
    """As _token_entries for any tokens and their logprob dicts; a None dict (the prompt's first token) gives
    (token, None, None)."""
    def tok(t: int, lp) -> tuple[str, list[int]]:
        text = lp.decoded_token if lp is not None and lp.decoded_token is not None else b.token_text(t)
        return text, b.token_bytes(t, text)

    entries = []
    for t, d in zip(ids, lps):
        if d is None:
            entries.append((tok(t, None), None, None))
            continue
        tops = sorted(d.items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))[:top_n]
        chosen = d.get(t)
        entries.append((tok(t, chosen), chosen.logprob if chosen else float("-inf"),
                        [(tok(tt, lp), lp.logprob) for tt, lp in tops]))
    return entries


def _lp(v: float) -> float:
    return max(v, -9999.0)  # JSON has no -inf (OpenAI's floor)


def _chat_logprobs(entries) -> list[dict]:
    def one(tok: tuple[str, list[int]], lp: float) -> dict:
        return {"token": tok[0], "logprob": _lp(lp), "bytes": tok[1]}
    return [{**one(t, lp), "top_logprobs": [one(tt, tlp) for tt, tlp in tops]} for t, lp, tops in entries]


class _CompletionLogprobs:
    def __init__(self, offset: int = 0):
        self.offset = offset

    def chunk(self, entries) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for (text, _), lp, tops in entries:  # lp and tops are None for the prompt's first token
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else _lp(lp))
            out["top_logprobs"].append(None if tops is None else {t: _lp(v) for (t, _), v in tops})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def _merge_logprobs(acc: dict | None, part: dict) -> dict:
    if acc is None:
        return part
    for k in acc:
        acc[k].extend(part[k])
    return acc


# ---- /v1/chat/completions --------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    b = _backend(request)
    b.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    tools = convert.openai_tools(body.tools)
    choice = resolve_tool_choice(body.tool_choice, tools, "tool_choice", body.parallel_tool_calls is False)
    messages = convert.openai_messages(body.messages)
    prompt_text = b.render_chat(messages, choice.template_tools)
    prompt_ids = b.encode(prompt_text + choice.forced_prefix)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    params = await _params(b, body, len(prompt_ids), max_tokens, top_n, choice)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    parsers = [ToolStream(choice) for _ in params]
    meta = {"id": rid, "created": int(time.time()), "model": b.model_name}
    usage = body.stream_options is not None and body.stream_options.include_usage
    gens = await b.start_n(rid, prompt_ids, params)  # from here on nothing may raise before the response owns gens
    if body.stream:
        return SSEResponse(_chat_stream(b, meta, gens, parsers, len(prompt_ids), top_n, usage), _stream_error, gens)
    return JSONResponse(await until_disconnect(_chat_full(b, meta, gens, parsers, len(prompt_ids), top_n),
                                               request, gens))


async def _chat_full(b: Backend, meta: dict, gens, parsers, prompt_len: int, top_n: int | None) -> dict:
    texts: list[list[str]] = [[] for _ in gens]  # pieces, joined once at the end
    logprobs: list[list | None] = [[] if top_n is not None else None for _ in gens]
    async for i, out in merge(gens):
        texts[i].append(out.delta_text)
        if top_n is not None:
            logprobs[i].extend(_chat_logprobs(_token_entries(b, out, top_n)))
    choices = []
    for i, g in enumerate(gens):
        content, calls = parsers[i].parse_all("".join(texts[i]))
        msg: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        finish = _finish(g.finish_reason)
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
            finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": i, "message": msg,
                        "logprobs": {"content": logprobs[i]} if logprobs[i] is not None else None,
                        "finish_reason": finish})
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(prompt_len, gens)}


async def _chat_stream(b: Backend, meta: dict, gens, parsers, prompt_len: int, top_n: int | None,
                       include_usage: bool) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}
    if include_usage:
        base["usage"] = None

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        c = {"index": i, "delta": delta, "logprobs": {"content": logprobs} if logprobs is not None else None,
             "finish_reason": finish}
        return sse_data({**base, "choices": [c]})

    for i in range(len(gens)):
        yield chunk(i, {"role": "assistant", "content": ""})
    saw_call = [False] * len(gens)
    async for i, out in merge(gens):
        lp = _chat_logprobs(_token_entries(b, out, top_n)) if top_n is not None else None
        deltas = parsers[i].feed(out.delta_text)
        if out.finish_reason is not None:
            deltas += parsers[i].finish()
        for d in _openai_deltas(deltas):
            saw_call[i] |= "tool_calls" in d
            yield chunk(i, d, logprobs=lp)
            lp = None
        if lp:  # tokens whose text is held back (stop-string prefix, inside a call) still report logprobs
            yield chunk(i, {}, logprobs=lp)
        if out.finish_reason is not None:
            finish = _finish(out.finish_reason)
            yield chunk(i, {}, "tool_calls" if saw_call[i] and finish == "stop" else finish)
    if include_usage:
        yield sse_data({**base, "choices": [], "usage": _usage(prompt_len, gens)})
    yield "data: [DONE]\n\n"


def _openai_deltas(events) -> list[dict]:
    """Protocol-neutral tool-stream events -> OpenAI chat deltas (see tool_stream.py)."""
    out = []
    for ev in events:
        if ev.kind == "text":
            out.append({"content": ev.text})
        elif ev.kind == "call":
            out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}}]})
        elif ev.kind == "args":
            out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
    return out


# ---- /v1/completions -------------------------------------------------------------------------------------
def _prompts(b: Backend, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [b.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [b.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids, and not empty", "prompt")
    for i, ids in enumerate(prompts):
        if not ids:
            raise bad_request(f"prompt[{i}] is empty", "prompt")
        b.check_token_ids(ids, "prompt")
    return prompts


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    b = _backend(request)
    b.check_model(body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (leave it unset or equal to n)", "best_of")
    if body.suffix:
        raise bad_request("suffix is not supported; use a fill-in-the-middle prompt instead", "suffix")
    prompts = _prompts(b, body.prompt)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for this route
    # echo + logprobs: the prompt's tokens get logprobs too (the engine scores every prompt position)
    prompt_lps = body.logprobs if body.echo else None
    params = [await _params(b, body, len(ids), max_tokens, body.logprobs, prompt_logprobs=prompt_lps)
              for ids in prompts]
    echo = [_Echo(b.decode(ids) if body.echo else "", ids, bool(body.echo)) for ids in prompts for _ in range(body.n)]
    prompt_len = sum(len(p) for p in prompts)
    rid = f"cmpl-{uuid.uuid4().hex}"
    meta = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": b.model_name}
    usage = body.stream_options is not None and body.stream_options.include_usage
    gens: list[Generation] = []
    try:  # choice index = prompt index * n + i
        for k, ids in enumerate(prompts):
            gens += await b.start_n(f"{rid}-{k}" if len(prompts) > 1 else rid, ids, params[k])
    except BaseException:
        for g in gens:
            await g.close()
        raise
    if body.stream:
        return SSEResponse(_completion_stream(b, meta, gens, echo, body.logprobs, prompt_len, usage),
                           _stream_error, gens)
    return JSONResponse(await until_disconnect(_completion_full(b, meta, gens, echo, body.logprobs, prompt_len),
                                               request, gens))


class _Echo:
    """The echoed prompt of one choice: its text, and its logprobs once the first output brought them."""

    def __init__(self, text: str, ids: list[int], on: bool):
        self.text, self.ids, self.on = text, ids, on

    def logprobs(self, b: Backend, g: Generation, top_n: int | None) -> dict | None:
        if top_n is None or not self.on or g.prompt_logprobs is None:
            return None
        return _CompletionLogprobs(0).chunk(_entries(b, self.ids, g.prompt_logprobs, top_n))


async def _completion_full(b: Backend, meta, gens, echo: list[_Echo], top_n, prompt_len) -> dict:
    texts = [[e.text] for e in echo]  # pieces, joined once at the end
    lp_state = [_CompletionLogprobs(len(e.text)) for e in echo]
    lps: list[dict | None] = [None] * len(gens)
    async for i, out in merge(gens):
        texts[i].append(out.delta_text)
        if top_n is not None:
            if lps[i] is None:  # the first output of choice i: its echoed prompt's logprobs come first
                lps[i] = echo[i].logprobs(b, gens[i], top_n)
            lps[i] = _merge_logprobs(lps[i], lp_state[i].chunk(_token_entries(b, out, top_n)))
    choices = [{"index": i, "text": "".join(texts[i]), "logprobs": lps[i] if top_n is not None else None,
                "finish_reason": _finish(g.finish_reason)} for i, g in enumerate(gens)]
    return {**meta, "choices": choices, "usage": _usage(prompt_len, gens)}


async def _completion_stream(b: Backend, meta, gens, echo: list[_Echo], top_n, prompt_len,
                             include_usage) -> AsyncIterator[str]:
    base = {**meta, **({"usage": None} if include_usage else {})}
    lp_state = [_CompletionLogprobs(len(e.text)) for e in echo]

    def chunk(i: int, text: str, lp: dict | None, finish: str | None = None) -> str:
        return sse_data({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

    # with logprobs the echo waits for the choice's first output, which brings the prompt's logprobs
    pending = [e.on and top_n is not None for e in echo]
    for i, e in enumerate(echo):
        if e.text and not pending[i]:
            yield chunk(i, e.text, None)
    async for i, out in merge(gens):
        if pending[i]:
            pending[i] = False
            yield chunk(i, echo[i].text, echo[i].logprobs(b, gens[i], top_n))
        lp = lp_state[i].chunk(_token_entries(b, out, top_n)) if top_n is not None else None
        if out.delta_text or lp and lp["tokens"] or out.finish_reason is not None:
            yield chunk(i, out.delta_text, lp, _finish(out.finish_reason) if out.finish_reason is not None else None)
    if include_usage:
        yield sse_data({**base, "choices": [], "usage": _usage(prompt_len, gens)})
    yield "data: [DONE]\n\n"
