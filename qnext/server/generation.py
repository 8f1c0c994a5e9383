"""One engine request as the adapters iterate it (Generation), several merged (merge), and the watch for a
client that leaves during a non-streaming request (until_disconnect)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import AsyncIterator

import anyio

from qnext.engine.async_engine import EngineDeadError
from qnext.sampling_params import CompletionOutput, RequestOutput
from qnext.server.errors import APIError
from qnext.server.metrics import ServerMetrics

log = logging.getLogger("qnext.server")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks for a gone client


class ClientGone(Exception):
    """The HTTP client disconnected; its engine requests are aborted."""


class Generation:
    """One admitted engine request. Iterate for CompletionOutputs (deltas filled); close() aborts if unfinished.

    Invariant: the log line and the finish metrics are written exactly once, whether the request finished,
    failed or was aborted (closing is shielded from the cancellation of a disconnected client's task).
    """

    def __init__(self, metrics: ServerMetrics, request_id: str, prompt_len: int, agen, first: asyncio.Task,
                 arrival: float):
        self.metrics, self.request_id, self.prompt_len = metrics, request_id, prompt_len
        self._agen, self._first, self._arrival = agen, first, arrival  # first: the pending first __anext__
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.prompt_logprobs: list | None = None  # when asked for: set before the first output is yielded
        self._ttft: float | None = None
        self._last = arrival
        self._closed = False

    def _observe(self, ro: RequestOutput) -> None:
        if ro.prompt_logprobs is not None:
            self.prompt_logprobs = ro.prompt_logprobs
        out = ro.outputs[0]
        now = time.monotonic()
        n = len(out.delta_token_ids)
        m = self.metrics
        if n:
            if self._ttft is None:
                self._ttft = now - self._arrival
                m.ttft.observe(self._ttft)
            else:  # a step may release several tokens: spread the gap evenly
                for _ in range(n):
                    m.itl.observe((now - self._last) / n)
            self._last = now
            self.num_output_tokens += n
            m.generation_tokens.inc(n)
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason

    async def __aiter__(self) -> AsyncIterator[CompletionOutput]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                try:
                    ro = await first
                except StopAsyncIteration:
                    return
                self._observe(ro)
                yield ro.outputs[0]
                if ro.finished:
                    return
            async for ro in self._agen:
                self._observe(ro)
                yield ro.outputs[0]
                if ro.finished:
                    return
        except EngineDeadError as e:
            raise APIError(503, f"the engine stopped: {e}") from None
        except APIError:
            raise
        except Exception as e:  # an engine-side failure of this request: reported, never a torn stream
            log.exception("%s failed in the engine", self.request_id)
            raise APIError(500, f"the request failed in the engine: {type(e).__name__}: {e}") from None
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._first is not None and not self._first.done():
                self._first.cancel()
            if self._first is not None:
                await asyncio.gather(self._first, return_exceptions=True)
            await self._agen.aclose()  # the engine's generator aborts an unfinished request on close
        reason = self.finish_reason or "abort"
        m = self.metrics
        m.request_success.labels(finished_reason=reason).inc()
        e2e = time.monotonic() - self._arrival
        if reason != "abort":
            m.e2e.observe(e2e)
        decode_s = e2e - (self._ttft or e2e)
        tps = (self.num_output_tokens - 1) / decode_s if decode_s > 0 and self.num_output_tokens > 1 else 0.0
        ttft = f"{self._ttft:.3f}s" if self._ttft is not None else "-"
        log.info("%s prompt=%d output=%d ttft=%s e2e=%.3fs %.1f tok/s finish=%s", self.request_id, self.prompt_len,
                 self.num_output_tokens, ttft, e2e, tps, reason)


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """Interleave the outputs of several generations as they come: (choice index, output). The first error
    of any generation is raised at once. Closing this iterator closes (aborts) every generation."""
    if len(gens) == 1:
        async with aclosing(gens[0].__aiter__()) as it:
            async for out in it:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for out in g:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, out = await queue.get()
            if out is done:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        with anyio.CancelScope(shield=True):
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in gens:
                await g.close()


async def until_disconnect(coro, http_request, gens: list[Generation]):
    """Run `coro` (a whole non-streaming request over `gens`); cancel it when the client leaves (ClientGone).
    The generations are closed on every way out."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await http_request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientGone()
    finally:
        with anyio.CancelScope(shield=True):
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for g in gens:
                await g.close()
