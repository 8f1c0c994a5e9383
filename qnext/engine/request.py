"""Request: one sequence as the scheduler and engine see it.

The one catch-up rule: a request has `num_tokens` (prompt + generated so far) and `num_computed_tokens` (how
many of them are in its KV pages and GDN state). Each step the scheduler gives it `num_tokens -
num_computed_tokens` tokens (or fewer: a prefill chunk); when the step reaches its last token a new token is
sampled and appended. There is no prefill phase and decode phase; preemption resets num_computed_tokens to 0
and the request catches up again (prompt and outputs alike).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"            # back in the waiting queue, recomputes from zero
    FINISHED_STOPPED = "stop"          # eos, stop token or stop string
    FINISHED_LENGTH = "length"         # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"         # client gone or engine shutdown

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish_reason: "stop" | "length" | "abort", None while unfinished."""
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int                    # resolved: the params' value, or what max_model_len leaves
    params: Any = None                 # SamplingParams (the scheduler never reads it)
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # tokens sampled by a step still on the device (0 or 1): the engine may schedule the next step before reading
    # them, which then feeds this token from the device (see LLMEngine.step)
    num_inflight: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)   # KV pages, in token order
    state_slot: int | None = None                          # GDN state slot while running
    num_preemptions: int = 0

    # attached by the engine
    detokenizer: Any = None
    stop_checker: Any = None
    sampling_row: Any = None           # SamplingRow: params, live output ids, seeded generator
    # sampling reads this request's previous token (penalties, logits processors, min_tokens) or the step scores
    # prompt logprobs: the next step is scheduled only once this one's tokens are read
    needs_sync: bool = False
    cumulative_logprob: float = 0.0
    logprobs: list | None = None       # one dict per output token, when params.logprobs is set
    # when params.prompt_logprobs is set: [None] + one dict per later prompt token, filled as prefill chunks run;
    # the first num_prompt_logprobs entries are final (kept across preemption, never recomputed)
    prompt_logprobs: list | None = None
    num_prompt_logprobs: int = 0
    stop_reason: str | int | None = None

    # timing (time.monotonic seconds)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        # prompt + outputs in one list: the runner slices a step's input ids from it
        self._all_token_ids = self.prompt_token_ids + list(self.output_token_ids)

    # ---- counts ---------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs; do not mutate (use append_token)."""
        return self._all_token_ids

    @property
    def max_num_tokens(self) -> int:
        """Tokens this request can ever hold: prompt + max_tokens."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt positions whose logits must still be scored (position p scores prompt token p + 1)."""
        return self.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
