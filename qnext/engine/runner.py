"""ModelRunner: one scheduled step -> ForwardBatch on the device -> model -> sampled tokens.

Owns the model and its ModelCache. Per step:
  1. build the ForwardBatch from the scheduled chunks (input ids sliced from each request's tokens, positions,
     slot_mapping from its page table, cu lens, GDN state slots, has_initial_state = context_len > 0), and the
     row indices of the logits this step needs, before the forward is queued;
  2. forward under torch.inference_mode (decode-only batches go through `decode_forward`, the seam where a
     CUDA-graph runner will plug in);
  3. logits only for the requests whose chunk ends at their current last token (finished prefills and
     decodes), sampled by the Sampler, plus, for requests that ask for prompt_logprobs, logits of every prompt
     position of their chunk not scored yet.
`launch` queues all of it and returns a PendingStep; its `result()` is the step's one host sync (sampled ids,
logprobs and prompt logprobs come back through events, so work queued after the step does not delay them).
Between the two the engine may launch the next step (see LLMEngine.step). Host lists reach the device through
`to_device` / `pack_to_device` (pinned, asynchronous), so nothing else waits for queued kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qnext.cache.model_cache import ModelCache
from qnext.engine.forward_batch import ForwardBatch
from qnext.engine.host_device import HostCopy, to_device
from qnext.engine.request import Request
from qnext.engine.sampler import PendingSample, Sampler, SamplerOutput, logprob_dicts, topn_logprobs
from qnext.engine.scheduler import ScheduledRequest
from qnext.sampling_params import Logprob

# Prompt positions scored per compute_logits call: bounds the [rows, vocab] float32 logits of a long chunk
# (512 x 151936 x 4 B = 311 MB).
PROMPT_LOGPROBS_ROWS = 512


@dataclass
class PromptLogprobsChunk:
    request: Request
    first: int                                   # index into request.prompt_logprobs of the first entry
    entries: list[dict[int, Logprob]]            # for prompt tokens first, first + 1, ...


@dataclass
class StepResult:
    requests: list[Request]        # the requests that got a token, in batch order
    sampler_output: SamplerOutput | None  # token_ids[i] / logprobs[i] belong to requests[i]; None: none sampled
    prompt_logprobs: list[PromptLogprobsChunk] = field(default_factory=list)


@dataclass
class PendingStep:
    """A step queued on the device; result() waits for its sampled tokens (and prompt logprobs)."""
    scheduled: list[ScheduledRequest]
    requests: list[Request]                      # the requests that get a token, in batch order
    sample: PendingSample | None                 # None: no chunk ends a sequence
    prompt_plan: list = field(default_factory=list)
    prompt_copy: HostCopy | None = None

    def row_of(self) -> dict[Request, int]:
        """request -> its row in sample.sampled."""
        return {r: i for i, r in enumerate(self.requests)}

    def result(self) -> StepResult:
        out = self.sample.result() if self.sample is not None else None
        chunks = []
        if self.prompt_plan:
            entries = logprob_dicts(*self.prompt_copy.wait(), [r.params.prompt_logprobs for r, _, _, targets
                                                               in self.prompt_plan for _ in targets])
            k = 0
            for r, first, _, targets in self.prompt_plan:
                chunks.append(PromptLogprobsChunk(r, first, entries[k: k + len(targets)]))
                k += len(targets)
        return StepResult(self.requests, out, chunks)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: ModelCache, sampler: Sampler | None = None):
        self.model = model
        self.cache = cache
        self.sampler = sampler or Sampler()
        self.device = cache.device
        self.block_size = cache.block_size
        # Decode-only batches (every q_len == 1) call this with the batch; a CUDA-graph runner replaces it.
        self.decode_forward: Callable[[ForwardBatch], torch.Tensor] | None = None

    def prepare(self, scheduled: list[ScheduledRequest], previous: PendingStep | None = None) -> ForwardBatch:
        """The step's batch. A request whose last token is still being sampled by `previous` (the step queued
        before this one, not read back yet) feeds that token straight from previous's sampled ids on the device."""
        token_ids, context_lens, tables, slots, patch = [], [], [], [], []
        rows, flat = None, 0
        for s in scheduled:
            r = s.request
            ids = r.all_token_ids[s.context_len: s.context_len + s.num_new_tokens]
            if len(ids) < s.num_new_tokens:            # the last one is in flight (Request.num_inflight)
                if rows is None:
                    rows = previous.row_of()
                patch.append((flat + len(ids), rows[r]))
                ids = ids + [0]
            token_ids.append(ids)
            context_lens.append(s.context_len)
            tables.append(r.block_ids)
            slots.append(r.state_slot)
            flat += s.num_new_tokens
        batch = ForwardBatch.build(token_ids, context_lens, tables, slots, self.block_size, self.device)
        if patch:
            dst, src = zip(*patch)
            n = len(dst)
            if dst == tuple(range(dst[0], dst[0] + n)) and src == tuple(range(src[0], src[0] + n)):
                batch.input_ids[dst[0]: dst[0] + n] = previous.sample.sampled[src[0]: src[0] + n]   # one copy
            else:
                idx = to_device(dst + src, torch.int64, self.device)
                batch.input_ids[idx[:n]] = previous.sample.sampled[idx[n:]]
        return batch

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """hidden [T, hidden]; writes the batch's KV and GDN states into the cache."""
        if batch.is_decode and self.decode_forward is not None:
            return self.decode_forward(batch)
        return self.model(batch, self.cache)

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledRequest], previous: PendingStep | None = None) -> PendingStep | None:
        """Queue one step (forward, sampling, copies to the host) without waiting for it; None when nothing is
        scheduled. `previous`: the step queued before, when its tokens are not read yet (see prepare)."""
        if not scheduled:
            return None
        batch = self.prepare(scheduled, previous)
        last = [i for i, s in enumerate(scheduled) if s.is_last_chunk]
        plan = _prompt_logprob_rows(scheduled, batch.query_lens)
        idx = None
        if last and len(last) < len(scheduled):  # made before the forward is queued: no wait for it
            ends = _cumsum(batch.query_lens)
            idx = to_device([ends[i] - 1 for i in last], torch.int64, self.device)
        prompt_targets = (to_device([t for _, _, _, targets in plan for t in targets], torch.int64, self.device)
                          if plan else None)
        hidden = self.forward(batch)                                   # [T, hidden]
        step = PendingStep(scheduled, [scheduled[i].request for i in last], None, plan)
        if plan:
            step.prompt_copy = HostCopy(self._score_prompt(hidden, plan, prompt_targets))
        if last:
            # a decode-only step's rows are all last tokens, in order (logits_indices = arange): no gather
            rows = hidden if idx is None and batch.is_decode else hidden[batch.logits_indices if idx is None else idx]
            logits = self.model.compute_logits(rows, dtype=None)                       # [B', V], lm_head's dtype
            step.sample = self.sampler.sample_async(logits, [r.sampling_row for r in step.requests])
        return step

    def _score_prompt(self, hidden: torch.Tensor, plan: list, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw log_softmax of the logits at every planned row, scored against the next prompt token; top-N."""
        rows = to_device([i for _, _, flat_rows, _ in plan for i in flat_rows], torch.int64, self.device)
        n_top = max(r.params.prompt_logprobs for r, _, _, _ in plan)
        parts = []
        for s in range(0, rows.numel(), PROMPT_LOGPROBS_ROWS):
            lp = torch.log_softmax(self.model.compute_logits(hidden[rows[s: s + PROMPT_LOGPROBS_ROWS]]), dim=-1)
            parts.append(topn_logprobs(lp, targets[s: s + PROMPT_LOGPROBS_ROWS], n_top))
        return tuple(torch.cat(col) for col in zip(*parts))


def _cumsum(lens: list[int]) -> list[int]:
    out, total = [], 0
    for n in lens:
        total += n
        out.append(total)
    return out


def _prompt_logprob_rows(scheduled: list[ScheduledRequest], query_lens: list[int]) -> list[tuple]:
    """(request, first entry, flat rows, target token ids) for each request with prompt positions to score here.

    The chunk covers positions [c, c + n); position p scores prompt token p + 1, so p < P - 1 (the last prompt
    position predicts the first output token, which the sampler handles). Entries already final (kept across a
    preemption) are skipped.
    """
    plan, start = [], 0
    for s, n in zip(scheduled, query_lens):
        r = s.request
        if r.prompt_logprobs_pending:
            P, c = r.num_prompt_tokens, s.context_len
            lo, hi = max(c, r.num_prompt_logprobs - 1), min(c + n, P - 1)
            if lo < hi:
                plan.append((r, lo + 1, range(start + lo - c, start + hi - c), r.prompt_token_ids[lo + 1: hi + 1]))
        start += n
    return plan
