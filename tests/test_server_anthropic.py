"""`qnext serve` as a black box, driven by the real `anthropic` client (random tiny weights: assert structure)."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from server_fixture import ServerProcess, tiny_checkpoint

TOOLS = [
    {"name": "get_weather", "description": "Weather of a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                      "required": ["city"]}},
    {"name": "read_file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}},
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
MODEL = "claude-local"  # any name is accepted on /v1/messages


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_checkpoint()) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a raw SSE stream; each data's "type" must equal its event name."""
    out = []
    with httpx.stream("POST", server.base_url + "/v1/messages", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                out.append((name, data))
    return out


def _check_order(events: list[tuple[str, dict]]) -> list[dict]:
    """message_start, [ping], (content_block_start, content_block_delta*, content_block_stop)*, message_delta,
    message_stop; block indexes count up from 0. Returns the started blocks."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks, open_index = [], None
    for name, data in events[1:-2]:
        if name == "ping":
            continue
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            open_index = data["index"]
            blocks.append({**data["content_block"], "deltas": []})
        elif name == "content_block_delta":
            assert data["index"] == open_index
            blocks[-1]["deltas"].append(data["delta"])
        else:
            assert name == "content_block_stop" and data["index"] == open_index
            open_index = None
    assert open_index is None
    return blocks


def test_message_non_stream(client):
    m = client.messages.create(model=MODEL, max_tokens=6, system="Be brief.", messages=USER)
    assert m.role == "assistant" and m.model == MODEL and m.stop_reason in ("max_tokens", "end_turn")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 6
    assert all(b.type == "text" for b in m.content)


def test_stream_event_order_exact(server, client):
    body = {"model": MODEL, "max_tokens": 6, "messages": USER,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]}
    events = _events(server, body)
    blocks = _check_order(events)
    assert all(b["type"] == "text" and all(d["type"] == "text_delta" for d in b["deltas"]) for b in blocks)
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn") and delta["usage"]["output_tokens"] <= 6
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    with client.messages.stream(model=MODEL, max_tokens=5, messages=USER) as s:  # the SDK's own accumulator
        final = s.get_final_message()
    assert final.usage.output_tokens <= 5 and final.stop_reason in ("max_tokens", "end_turn")


def test_stop_sequence(client):
    greedy = client.messages.create(model=MODEL, max_tokens=12, extra_body={"temperature": 0.0}, messages=USER)
    text = "".join(b.text for b in greedy.content if b.type == "text")
    stop = next((ch for ch in text[1:] if ch.strip()), None)
    if stop is None:
        pytest.skip("greedy output has no usable character")
    m = client.messages.create(model=MODEL, max_tokens=12, extra_body={"temperature": 0.0}, messages=USER,
                               stop_sequences=[stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert stop not in "".join(b.text for b in m.content if b.type == "text")[1:]


def test_named_tool_use_round_trip(client):
    m = client.messages.create(model=MODEL, max_tokens=12, messages=USER, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason in ("tool_use", "max_tokens")
    use = [b for b in m.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and isinstance(use.input, dict)
    follow = client.messages.create(model=MODEL, max_tokens=4, tools=TOOLS, messages=USER + [
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, use.model_dump()]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"},
            {"type": "tool_result", "tool_use_id": use.id, "is_error": True,
             "content": [{"type": "text", "text": "timeout"}]},
            {"type": "text", "text": "And tomorrow?"}]}])
    assert follow.role == "assistant" and follow.usage.input_tokens > m.usage.input_tokens


def test_any_tool_use_streams_input_json(server):
    pytest.importorskip("xgrammar")  # without it the tool name is not constrained (gibberish is no call)
    events = _events(server, {"model": MODEL, "max_tokens": 12, "messages": USER, "tools": TOOLS,
                              "tool_choice": {"type": "any"}})
    blocks = _check_order(events)
    uses = [b for b in blocks if b["type"] == "tool_use"]
    assert uses and uses[0]["name"] in ("get_weather", "read_file") and uses[0]["input"] == {}
    assert all(d["type"] == "input_json_delta" for d in uses[0]["deltas"])
    assert isinstance(json.loads("".join(d["partial_json"] for d in uses[0]["deltas"])), dict)
    assert events[-2][1]["delta"]["stop_reason"] in ("tool_use", "max_tokens")


def test_count_tokens(client):
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, system="Be brief.")
    n = client.messages.count_tokens(**kw).input_tokens
    m = client.messages.create(max_tokens=1, **kw)
    assert n == m.usage.input_tokens > 0
    # Claude Code's per-request billing header is dropped from the prompt (it would defeat prefix caching)
    billing = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1.0; cch=abc123;"},
               {"type": "text", "text": "Be brief."}]
    assert client.messages.count_tokens(**{**kw, "system": billing}).input_tokens == n


def test_structured_output(client):
    """output_config.format json_schema: constrained decoding; the text is a prefix of the schema's JSON."""
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    m = client.messages.create(model=MODEL, max_tokens=30, messages=USER,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    text = "".join(b.text for b in m.content if b.type == "text")
    compact = "".join(text.split())
    assert '{"ok":true}'.startswith(compact) or '{"ok":false}'.startswith(compact), text
    if m.stop_reason == "end_turn":
        assert json.loads(text) in ({"ok": True}, {"ok": False})


def test_errors_are_anthropic_style(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=0, messages=USER)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.base_url + "/v1/messages", json={"model": MODEL, "messages": USER})  # no max_tokens
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
