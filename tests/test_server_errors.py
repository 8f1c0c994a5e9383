"""Bad input is a clean 4xx with the right error body (never a 500, never a hang); auth; a full queue is a 429."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import openai
import pytest
from server_fixture import MODEL_NAME, ServerProcess, tiny_checkpoint

KEY = "sk-test-123"
USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
CHAT = {"model": MODEL_NAME, "messages": USER, "max_tokens": 2}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_checkpoint(), "--api-key", KEY, "--max-model-len", "256") as srv:
        yield srv


def _post(server, path: str, body=None, content: bytes | None = None, auth: bool = True) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"} if auth else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.base_url + path, content=content, headers=headers, timeout=30)
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=30)


def test_api_key(server):
    assert _post(server, "/v1/chat/completions", CHAT, auth=False).status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.body["type"] == "authentication_error"
    ok = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(**CHAT).choices[0].message.role == "assistant"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=2, messages=USER)
    for kw in ({"api_key": KEY}, {"auth_token": KEY}):  # x-api-key, and Authorization: Bearer (Claude Code)
        client = anthropic.Anthropic(base_url=server.base_url, max_retries=0, **kw)
        assert client.messages.create(model="m", max_tokens=2, messages=USER).role == "assistant"


BAD_OPENAI = [  # (path, body or raw bytes, expected status, expected param or None)
    ("/v1/chat/completions", b'{"model": "tiny-coder", "messages": [', 400, None),
    ("/v1/chat/completions", b'[1, 2]', 400, None),
    ("/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 2}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, 400, "top_k"),
    ("/v1/chat/completions", {**CHAT, "min_p": 3}, 400, "min_p"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 9}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 50}, 400, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages[0].content[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, 400,
     "messages[0].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**70}, 400, "seed"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_OPENAI, ids=[f"{i}" for i in range(len(BAD_OPENAI))])
def test_bad_openai_requests(server, path, body, status, param):
    r = _post(server, path, content=body) if isinstance(body, bytes) else _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "code" in err
    if param is not None:
        assert err["param"] == param, err


def test_prompt_too_long_names_the_limit(server):
    r = _post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]})
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    assert "max_model_len" in r.json()["error"]["message"]
    # a large max_tokens is lowered to what the context leaves, not refused (agents send fixed large values)
    assert _post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 100000}).status_code == 200


BAD_ANTHROPIC = [
    {"model": "m", "messages": USER},                                        # no max_tokens
    {"model": "m", "max_tokens": "many", "messages": USER},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
    {"model": "m", "max_tokens": 4, "messages": USER, "temperature": -2},
    {"model": "m", "max_tokens": 4, "messages": USER, "top_p": 0},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
    {"model": "m", "max_tokens": 4, "messages": USER, "tool_choice": {"type": "tool", "name": "nope"},
     "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
    {"model": "m", "max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"}},
    {"model": "m", "max_tokens": 4, "messages": USER, "output_config": {"format": {"type": "xml"}}},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 400}]},
]


@pytest.mark.parametrize("body", BAD_ANTHROPIC, ids=[f"{i}" for i in range(len(BAD_ANTHROPIC))])
def test_bad_anthropic_requests(server, body):
    r = _post(server, "/v1/messages", body)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"]
    assert _post(server, "/v1/messages/count_tokens", {k: v for k, v in body.items() if k != "max_tokens"}
                 ).status_code in (200, 400)


def test_alive_after_bad_requests(server):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    assert _post(server, "/v1/chat/completions", CHAT).status_code == 200
    m = server.wait_idle()
    assert m["qnext:num_requests_running"] == 0 and m["qnext:kv_cache_pages_used"] == 0


def test_full_queue_is_429():
    """One running + one queued; the rest are refused at once with 429 and Retry-After."""
    with ServerProcess(tiny_checkpoint(), "--max-queue", "1", "--max-num-seqs", "1") as srv:
        body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 40, "ignore_eos": True}

        async def flood():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as h:
                return await asyncio.gather(*(h.post("/v1/chat/completions", json=body) for _ in range(6)))

        responses = asyncio.run(flood())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(srv.base_url + "/v1/messages", json={"model": "m", "max_tokens": 2, "messages": USER})
        assert r.status_code == 200  # accepted again once the queue drained
        m = srv.wait_idle()
        assert m['qnext:request_rejected_total{reason="queue_full"}'] >= 1
        assert m["qnext:kv_cache_pages_used"] == 0


def test_health_is_503_once_the_engine_died(tmp_path):
    """In-process app over a real AsyncEngine: /health is 200 while the loop runs; a poisoned step kills it, the
    request that hit it gets a 503, and /health answers 503 with an OpenAI-style error body from then on."""
    from fastapi.testclient import TestClient

    from qnext.config import EngineConfig
    from qnext.engine.async_engine import AsyncEngine
    from qnext.engine.llm_engine import LLMEngine
    from qnext.server.app import build_app
    from qnext.server.serving import ServerConfig

    core = LLMEngine.from_pretrained(tiny_checkpoint(), EngineConfig(device="cpu", dtype="float32",
                                                                     num_kv_blocks=64))
    engine = AsyncEngine(core)
    try:
        with TestClient(build_app(engine, ServerConfig(served_model_name=MODEL_NAME))) as http:
            assert http.get("/health").json() == {"status": "ok"}
            body = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 2}
            assert http.post("/v1/completions", json=body).status_code == 200

            def poisoned():
                raise RuntimeError("CUDA error: device-side assert triggered")

            core.step = poisoned
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 503 and "device-side assert" in r.json()["error"]["message"]
            r = http.get("/health")
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "engine_dead" and err["type"] == "server_error"
            assert "device-side assert" in err["message"]
            assert http.post("/v1/completions", json=body).status_code == 503  # refused up front
    finally:
        engine.shutdown()
