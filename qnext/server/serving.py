"""What both protocol adapters need from the engine, in one place: tokenizing, the chat template, sampling
params from request fields, and admission (400 / 429 / 503 before any byte is sent) of engine requests, each
then iterated as a Generation (generation.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qnext.engine.async_engine import EngineDeadError, QueueFullError
from qnext.sampling_params import SamplingParams
from qnext.server.errors import APIError, bad_request
from qnext.server.generation import Generation
from qnext.server.json_mode import Grammars
from qnext.server.metrics import ServerMetrics

log = logging.getLogger("qnext.server")

MAX_N = 16  # choices per request (each is one engine request)


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
    def sampling_params(self, prompt_len: int, max_tokens: int | None, prompt_param: str = "messages",
                        **fields: Any) -> SamplingParams:
        """Checkpoint defaults, then the request's fields (None = not given).

        max_tokens is clamped to the context left after the prompt (agents send large fixed values, e.g.
        32000, that should not fail on a server started with a smaller --max-model-len); a prompt that leaves
        no room is a 400 naming the limit.
        """
        room = self.max_model_len - prompt_len
        if room < 1:
            raise bad_request(f"the prompt has {prompt_len} tokens but this server's context (max_model_len) is "
                              f"{self.max_model_len} tokens for prompt and output together", prompt_param)
        seed = fields.get("seed")
        if seed is not None and not -2**63 <= seed < 2**63 - MAX_N:  # torch generators take 64-bit seeds
            raise bad_request(f"seed must be a 64-bit integer, got {seed}", "seed")
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
                log.info("%s prompt=%d rejected: %s", request_id, len(prompt_ids), e)
                raise APIError(429, f"the server is busy ({e}); retry shortly", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            if isinstance(e, EngineDeadError):
                raise APIError(503, f"the engine stopped: {e}")
            if isinstance(e, ValueError):
                self.metrics.request_rejected.labels(reason="invalid").inc()
                raise bad_request(str(e))
            raise e
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return Generation(self.metrics, request_id, len(prompt_ids), agen, first, arrival)

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
