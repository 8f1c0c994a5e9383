"""What both protocol adapters need from the engine, in one place: tokenizing, the chat template, sampling
params from request fields, admission (400 / 429 before any byte is sent) and a Generation per engine request
that records metrics, writes the request's log line and aborts the engine request when it is closed early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import torch

from qnext.engine.async_engine import EngineDeadError, QueueFullError
from qnext.sampling_params import CompletionOutput, SamplingParams
from qnext.server.errors import APIError, bad_request
from qnext.server.json_mode import Grammars
from qnext.server.metrics import ServerMetrics

log = logging.getLogger("qnext.server")

MAX_N = 16               # choices per request (each is one engine request)
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks for a gone client


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    model_path: str = ""
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    retry_after_s: int = 1          # Retry-After of a 429


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: each byte is written as one printable character; this maps it back."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


class ClientGone(Exception):
    """The HTTP client disconnected; its engine requests are aborted."""


class Generation:
    """One admitted engine request. Iterate for CompletionOutputs (deltas filled); close() aborts if unfinished.

    Invariant: the log line and the finish metrics are written exactly once, whether the request finished,
    failed or was aborted (closing is shielded from the cancellation of a disconnected client's task).
    """

    def __init__(self, backend: "Backend", request_id: str, prompt_len: int, agen, first: asyncio.Task,
                 arrival: float):
        self.backend, self.request_id, self.prompt_len = backend, request_id, prompt_len
        self._agen, self._first, self._arrival = agen, first, arrival  # first: the pending first __anext__
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._ttft: float | None = None
        self._last = arrival
        self._closed = False

    def _observe(self, out: CompletionOutput) -> None:
        now = time.monotonic()
        n = len(out.delta_token_ids)
        m = self.backend.metrics
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
                self._observe(ro.outputs[0])
                yield ro.outputs[0]
                if ro.finished:
                    return
            async for ro in self._agen:
                self._observe(ro.outputs[0])
                yield ro.outputs[0]
                if ro.finished:
                    return
        except EngineDeadError as e:
            raise APIError(503, f"the engine stopped: {e}") from None
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
        m = self.backend.metrics
        m.request_success.labels(finished_reason=reason).inc()
        e2e = time.monotonic() - self._arrival
        if reason != "abort":
            m.e2e.observe(e2e)
        decode_s = e2e - (self._ttft or e2e)
        tps = (self.num_output_tokens - 1) / decode_s if decode_s > 0 and self.num_output_tokens > 1 else 0.0
        ttft = f"{self._ttft:.3f}s" if self._ttft is not None else "-"
        log.info("%s prompt=%d output=%d ttft=%s e2e=%.3fs %.1f tok/s finish=%s", self.request_id, self.prompt_len,
                 self.num_output_tokens, ttft, e2e, tps, reason)


class Backend:
    """The engine as the adapters see it. Built once by build_app."""

    def __init__(self, async_engine: Any, config: ServerConfig):
        self.engine = async_engine
        self.config = config
        core = async_engine.engine  # LLMEngine: read-only facts here; only the engine thread drives it
        self.tokenizer = core.tokenizer            # None: the checkpoint has no tokenizer (token-id prompts only)
        self.chat_template = core.chat_template    # None: no template (/v1/completions only)
        self.model_config = core.model_config
        self.max_model_len: int = core.max_model_len
        self.vocab_size: int = self.model_config.vocab_size
        self.generation_config: dict = dict(core.generation_config or {})
        self.metrics = ServerMetrics(async_engine.stats)
        tok_json = Path(core.model_path or "") / "tokenizer.json"
        self.grammars = Grammars(self.tokenizer.get_vocab() if self.tokenizer is not None else {},
                                 tok_json.read_text(encoding="utf-8") if tok_json.is_file() else "{}",
                                 self.vocab_size, list(core.eos_token_ids))

    # ---- names ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, model: str | None) -> None:
        """OpenAI routes serve one model: another name is a 404 (Anthropic routes accept any name, see docs)."""
        if model is not None and model not in (self.model_name, self.config.model_path):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # ---- text -------------------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise bad_request("this checkpoint has no tokenizer: only token-id prompts are served", "prompt")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok().decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok().decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """The token's own bytes (a byte-level token may hold part of a UTF-8 character, whose text is U+FFFD)."""
        piece = self._tok().convert_ids_to_tokens([token_id])[0]
        if piece is None or any(ch not in _BYTE_OF for ch in piece):
            return list(text.encode("utf-8"))
        return [_BYTE_OF[ch] for ch in piece]

    def render_chat(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise bad_request("this checkpoint has no chat template: use /v1/completions", "messages")
        try:
            return self.chat_template.render(messages, tools=tools or None,
                                             add_generation_prompt=add_generation_prompt)
        except ValueError as e:  # ChatTemplateError: the conversation does not fit the template
            raise bad_request(f"messages: the chat template rejected the conversation: {e}", "messages") from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param)

    # ---- sampling ---------------------------------------------------------------------------------
    def sampling_params(self, prompt_len: int, max_tokens: int | None, **fields: Any) -> SamplingParams:
        """Checkpoint defaults, then the request's fields (None = not given).

        max_tokens is clamped to the context left after the prompt (agents send large fixed values, e.g.
        32000, that should not fail on a server started with a smaller --max-model-len); a prompt that leaves
        no room is a 400 naming the limit.
        """
        room = self.max_model_len - prompt_len
        if room < 1:
            raise bad_request(f"the prompt has {prompt_len} tokens but this server's context (max_model_len) is "
                              f"{self.max_model_len} tokens for prompt and output together", "messages")
        if max_tokens is not None:
            if max_tokens < 1:
                raise bad_request(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
            max_tokens = min(max_tokens, room)
        try:
            return SamplingParams.from_generation_config(self.generation_config, max_tokens=max_tokens, **fields)
        except ValueError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0]
            raise bad_request(msg, param if param.isidentifier() else None) from None

    def logit_bias(self, bias: dict[str, float] | None) -> Callable | None:
        if not bias:
            return None
        ids, values = [], []
        for key, value in bias.items():
            try:
                tok = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
            self.check_token_ids([tok], "logit_bias")
            if not -100 <= value <= 100:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
            ids.append(tok)
            values.append(float(value))

        def apply(_output_ids, logits):  # stateless: one instance may serve every choice
            logits[torch.tensor(ids, device=logits.device)] += torch.tensor(values, device=logits.device,
                                                                             dtype=logits.dtype)
            return logits

        return apply

    # ---- admission --------------------------------------------------------------------------------
    async def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Admit one engine request: 400 / 429 / 503 are raised here, before any byte of a response is sent.

        AsyncEngine.generate decides admission synchronously up to its first wait, so one pass of the event
        loop over its first __anext__ tells admitted from refused without waiting for the first token.
        """
        arrival = time.monotonic()
        agen = self.engine.generate(request_id, prompt_ids, params)
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)
        if first.done() and first.exception() is not None:
            e = first.exception()
            if isinstance(e, QueueFullError):
                self.metrics.request_rejected.labels(reason="queue_full").inc()
                raise APIError(429, f"the server is busy ({e}); retry shortly", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            if isinstance(e, EngineDeadError):
                raise APIError(503, f"the engine stopped: {e}")
            if isinstance(e, ValueError):
                self.metrics.request_rejected.labels(reason="invalid").inc()
                raise bad_request(str(e))
            raise e
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return Generation(self, request_id, len(prompt_ids), agen, first, arrival)

    async def start_n(self, request_id: str, prompt_ids: list[int], params: list[SamplingParams]) -> list[Generation]:
        """One engine request per choice (n > 1 fans out, seed + i); all admitted or none."""
        gens: list[Generation] = []
        try:
            for i, p in enumerate(params):
                rid = request_id if len(params) == 1 else f"{request_id}-{i}"
                gens.append(await self.start(rid, prompt_ids, p))
        except BaseException:
            for g in gens:
                await g.close()
            raise
        return gens


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """Interleave the outputs of several generations as they come: (choice index, output).
    Closing this iterator closes (aborts) every generation still running."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for out in g:
                await queue.put((i, out))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, out = await queue.get()
            if out is done:
                remaining -= 1
            else:
                yield i, out
        for t in tasks:
            t.result()  # surface a pump's error
    finally:
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
