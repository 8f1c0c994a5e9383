"""`qnext bench serve`: an async load generator for any OpenAI-compatible server.

Streams every request (`stream_options.include_usage` so the output token count is the server's own
`usage.completion_tokens`), with `--max-concurrency` as a semaphore and `--request-rate` arrivals (inf, or gamma
with `--burstiness`; 1 = Poisson). Prints a table like `vllm bench serve` and writes a JSON file of every metric and
the settings.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict

import httpx

from qnext.bench.random_dataset import BenchPrompt
from qnext.bench.serve_metrics import RequestResult


def _payload(endpoint: str, model: str, prompt: BenchPrompt, ignore_eos: bool, temperature: float) -> dict:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": prompt.output_len, "temperature": temperature}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang / qnext extension
    if endpoint.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


def _chunk_text(chunk: dict) -> str:
    out = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        out += (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
    return out


async def send_one(client: httpx.AsyncClient, url: str, body: dict, prompt_len: int, t0: float) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    sent = time.perf_counter()
    result.start_time = sent - t0
    last = sent
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if chunks == 0:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    result.output_tokens = int(usage["completion_tokens"])
        result.latency = last - sent
        if result.output_tokens == 0:
            result.output_tokens = chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "no text in the stream"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _arrivals(n: int, request_rate: float, burstiness: float, rng: random.Random):
    """Yields request indices at the requested rate (gamma inter-arrival times with mean 1/rate)."""
    for i in range(n):
        yield i
        if request_rate != float("inf") and i < n - 1:
            theta = 1.0 / (request_rate * burstiness)
            await asyncio.sleep(rng.gammavariate(burstiness, theta))


async def run_load(base_url: str, endpoint: str, model: str, prompts: list[BenchPrompt], *,
                   max_concurrency: int | None, request_rate: float, burstiness: float, ignore_eos: bool,
                   temperature: float, seed: int, warmups: list[BenchPrompt] | None = None, api_key: str | None,
                   timeout_s: float) -> tuple[list[RequestResult], float]:
    """Send `warmups` one at a time (not measured), then `prompts` under the concurrency / arrival-rate limits:
    (one result per prompt, the measured duration)."""
    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=max_concurrency or 1000)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        for p in warmups or []:
            await send_one(client, url, _payload(endpoint, model, p, ignore_eos, temperature), p.prompt_len, 0.0)
        t0 = time.perf_counter()

        async def guarded(p: BenchPrompt) -> RequestResult:
            body = _payload(endpoint, model, p, ignore_eos, temperature)
            if sem is None:
                return await send_one(client, url, body, p.prompt_len, t0)
            async with sem:
                return await send_one(client, url, body, p.prompt_len, t0)

        tasks = []
        async for i in _arrivals(len(prompts), request_rate, burstiness, random.Random(seed)):
            tasks.append(asyncio.create_task(guarded(prompts[i])))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


async def first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


def result_json(settings: dict, metrics: dict, results: list[RequestResult]) -> str:
    return json.dumps({"settings": settings, "metrics": metrics,
                       "requests": [asdict(r) for r in results]}, indent=1)
