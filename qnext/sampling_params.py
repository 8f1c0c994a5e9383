"""What a request asks of sampling (SamplingParams) and what it gets back (RequestOutput, CompletionOutput).

SamplingParams is validated once in __post_init__ (ValueError naming the field); the sampler and stop checker
then trust it. Outputs follow the vLLM shape. Each engine step yields one RequestOutput per request that got a
token, and it carries only that step's deltas (`delta_text`, `delta_token_ids`, `delta_logprobs`): building the
whole lists every step would cost O(tokens so far) per token. The cumulative fields (`text`, `token_ids`,
`logprobs`) are filled on the final output (finished=True) only; on earlier outputs they are empty ("", [],
None). `cumulative_logprob` is a running number on every output. `RequestOutput.prompt_logprobs` comes with the
request's first output (the one with its first token) and with its final output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

MAX_LOGPROBS = 20

# (output_token_ids, logits [V] float32) -> logits [V]; applied per row before penalties and sampling.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # a single str is accepted and wrapped
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16  # None: until the context is full (the engine supplies that cap)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N per generated token (0: only the sampled token)
    prompt_logprobs: int | None = None  # top-N per prompt token (0: only the actual token); see RequestOutput
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logits_processors = list(self.logits_processors or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (0 or -1 disables it)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if any(not callable(p) for p in self.logits_processors):
            raise bad("logits_processors", "must be callables (output_token_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    # generation_config.json key -> SamplingParams field
    _GEN_CONFIG_KEYS = {
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "min_p": "min_p",
        "repetition_penalty": "repetition_penalty",
        "max_new_tokens": "max_tokens",
    }

    @classmethod
    def from_generation_config(cls, gen_config: dict | str | Path | None, **overrides: Any) -> "SamplingParams":
        """Checkpoint defaults (generation_config.json: a dict, the file, or the checkpoint dir), then `overrides`.

        Keys absent from the file keep our defaults; `do_sample: false` means greedy (HF semantics).
        Overrides whose value is None are ignored, so request fields can be passed through as they come.
        """
        cfg = _read_json(gen_config, "generation_config.json")
        kwargs: dict[str, Any] = {}
        for key, name in cls._GEN_CONFIG_KEYS.items():
            if cfg.get(key) is not None:
                kwargs[name] = cfg[key]
        if cfg.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown SamplingParams fields: {sorted(unknown)}")
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)


def _read_json(source: dict | str | Path | None, filename: str) -> dict:
    if source is None:
        return {}
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob; holds the sampled token and the top-N.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing before it predicts it), then token id -> Logprob for the
# actual prompt token and the top-N, from the model's raw logits (no penalties, processors or temperature).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str  # whole output text: on the final output only ("" before, see the module docstring)
    token_ids: list[int]  # whole output: on the final output only ([] before)
    cumulative_logprob: float | None = None  # None unless logprobs were asked for; running sum on every output
    logprobs: SampleLogprobs | None = None  # whole output: on the final output only (None before)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # matched stop string or stop token id; None for eos / length
    delta_text: str = ""  # text released by this step (stop-string prefixes are held back)
    delta_token_ids: list[int] = field(default_factory=list)  # tokens of this step
    delta_logprobs: SampleLogprobs | None = None  # one dict per delta token; None unless logprobs were asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with the first and the final output, when asked for
