"""`qnext serve` as a black box, driven by the real `openai` client (random tiny weights: assert structure)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_fixture import MODEL_NAME, ServerProcess, tiny_checkpoint

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_checkpoint()) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_stream_matches_non_stream(client):
    kw = dict(model=MODEL_NAME, messages=USER, max_tokens=8, seed=7, temperature=0.8)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 8 and full.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (choice.message.content or "")  # same seed: same tokens, streamed or not
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_n_logprobs_stop(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_completion_tokens=4, n=3, seed=1,
                                       logprobs=True, top_logprobs=2, stop=["\n\n"])
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.content) >= 1
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and isinstance(entry.bytes, list)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_completions(client):
    r = client.completions.create(model=MODEL_NAME, prompt="def fib(n):", max_tokens=5, logprobs=2, echo=True,
                                  seed=3)
    c = r.choices[0]
    # echo + logprobs: the prompt's tokens come first, the very first without a logprob
    assert c.text.startswith("def fib(n):")
    assert len(c.logprobs.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs[1:])
    batch = client.completions.create(model=MODEL_NAME, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3] and batch.usage.prompt_tokens == 5
    stream = list(client.completions.create(model=MODEL_NAME, prompt="x = ", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert stream[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"


def test_echo_logprobs_are_the_prompts(client, server):
    """The echoed prompt's logprobs are the engine's prompt_logprobs (streamed or not); offsets run through."""
    from qnext.config import EngineConfig
    from qnext.engine.llm_engine import LLMEngine
    from qnext.sampling_params import SamplingParams

    kw = dict(model=MODEL_NAME, prompt="def fib(n):\n    return", max_tokens=3, logprobs=3, echo=True,
              temperature=0)
    full = client.completions.create(**kw)
    lp, n_prompt = full.choices[0].logprobs, full.usage.prompt_tokens
    engine = LLMEngine.from_pretrained(tiny_checkpoint(), EngineConfig(device="cpu", num_kv_blocks=16))
    ids = engine.tokenizer.encode(kw["prompt"])
    engine.add_request("p", ids, SamplingParams(max_tokens=1, prompt_logprobs=3))
    ref = [o for o in engine.step() if o.finished][0].prompt_logprobs
    assert n_prompt == len(ids) and lp.tokens[:n_prompt] == [engine.tokenizer.decode([t]) for t in ids]
    for j in range(1, n_prompt):
        assert lp.token_logprobs[j] == pytest.approx(ref[j][ids[j]].logprob, abs=1e-4)
        assert 1 <= len(lp.top_logprobs[j]) <= 3  # keyed by text: byte pieces that decode alike collide
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert lp.text_offset[n_prompt] == len(kw["prompt"])  # generated tokens start after the echoed text
    chunks = list(client.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].text == kw["prompt"]
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_startup_log(server):
    """The weights' loading bar, and one line with the resolved device, dtype and cache sizes."""
    log = server.log_text()
    assert "loading weights" in log
    assert log.count("engine on cpu, float32: KV cache") == 1 and "max_model_len" in log


def test_json_mode(client):
    """The output is always a prefix of valid JSON (checked by a fresh matcher), and whole JSON on "stop"."""
    xgr = pytest.importorskip("xgrammar")
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=40, seed=5,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    info = xgr.TokenizerInfo([chr(i) for i in range(32, 127)])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_builtin_json_grammar())
    assert matcher.accept_string(text), text
    if r.choices[0].finish_reason == "stop":
        json.loads(text)


def test_named_tool_call_round_trip(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=12, seed=2,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason in ("tool_calls", "length")
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments), dict)
    follow = client.chat.completions.create(model=MODEL_NAME, tools=TOOLS, max_tokens=4, messages=USER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert follow.choices[0].message.role == "assistant"


def test_required_tool_call_streams_incrementally(client):
    pytest.importorskip("xgrammar")  # without it the tool name is not constrained (gibberish is no call)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=12,
                                                 tool_choice="required", stream=True, seed=4))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name in ("get_weather", "get_time") and first.function.arguments == ""
    args = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert all(d.id is None for d in deltas[1:] if d.index == 0)
    assert isinstance(json.loads(args), dict)
    assert chunks[-1].choices[0].finish_reason in ("tool_calls", "length")


def test_tool_choice_none_and_auto_answer(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=choice,
                                           max_tokens=6)
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_sixteen_concurrent_streams(server):
    async def one(ac: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await ac.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6, seed=i,
                                                  stream=True, stream_options={"include_usage": True})
        text, usage = "", 0
        async for c in stream:
            text += "".join(ch.delta.content or "" for ch in c.choices)
            usage = c.usage.completion_tokens if c.usage else usage
        return text, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(16)))

    results = asyncio.run(main())
    assert len(results) == 16 and all(0 < usage <= 6 for _, usage in results)
    m = server.wait_idle()
    assert m["qnext:num_requests_running"] == 0 and m["qnext:kv_cache_pages_used"] == 0


def test_disconnect_mid_stream_frees_resources(server):
    before = server.metrics().get('qnext:request_success_total{finished_reason="abort"}', 0)
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.metrics()["qnext:num_requests_running"] == 1
    m = server.wait_idle()
    assert m["qnext:num_requests_running"] == 0 and m["qnext:kv_cache_pages_used"] == 0
    assert m["qnext:state_slots_used"] == 0
    assert m['qnext:request_success_total{finished_reason="abort"}'] == before + 1


def test_disconnect_non_streaming_aborts(server):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=1.5)
    m = server.wait_idle()
    assert m["qnext:num_requests_running"] == 0 and m["qnext:kv_cache_pages_used"] == 0


def test_tokenize_detokenize(server):
    tok = httpx.post(server.base_url + "/tokenize", json={"prompt": "def fib(n):"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert httpx.post(server.base_url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == \
        "def fib(n):"
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": USER}).json()
    assert chat["count"] > tok["count"]


def test_metrics_series(server):
    m = server.metrics()
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("qnext:time_to_first_token_seconds", "qnext:inter_token_latency_seconds",
                 "qnext:e2e_request_latency_seconds"):
        assert f"{name}_count" in m and f"# TYPE {name} histogram" in text
    for name in ("qnext:prompt_tokens_total", "qnext:generation_tokens_total", "qnext:num_requests_running",
                 "qnext:num_requests_waiting", "qnext:kv_cache_pages_used", "qnext:kv_cache_pages_total",
                 "qnext:state_slots_used", "qnext:state_slots_total"):
        assert name in m, name
    assert m["qnext:generation_tokens_total"] > 0
    assert any(k.startswith("qnext:request_success_total{") for k in m)
    assert "prompt=" in server.log_text() and "tok/s" in server.log_text()
