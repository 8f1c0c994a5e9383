"""ModelRunner: one scheduled step -> ForwardBatch on the device -> model -> sampled tokens.

Owns the model and its ModelCache. Per step:
  1. build the ForwardBatch from the scheduled chunks (input ids sliced from each request's tokens, positions,
     slot_mapping from its page table, cu lens, GDN state slots, has_initial_state = context_len > 0);
  2. forward under torch.inference_mode (decode-only batches go through `decode_forward`, the seam where a
     CUDA-graph runner will plug in);
  3. logits only for the requests whose chunk ends at their current last token (finished prefills and
     decodes), sampled by the Sampler; its `.tolist()` is the step's one host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qnext.cache.model_cache import ModelCache
from qnext.engine.forward_batch import ForwardBatch
from qnext.engine.request import Request
from qnext.engine.sampler import Sampler, SamplerOutput
from qnext.engine.scheduler import ScheduledRequest


@dataclass
class StepResult:
    requests: list[Request]        # the requests that got a token, in batch order
    sampler_output: SamplerOutput  # token_ids[i] / logprobs[i] belong to requests[i]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: ModelCache, sampler: Sampler | None = None):
        self.model = model
        self.cache = cache
        self.sampler = sampler or Sampler()
        self.device = cache.device
        self.block_size = cache.block_size
        # Decode-only batches (every q_len == 1) call this with the batch; a CUDA-graph runner replaces it.
        self.decode_forward: Callable[[ForwardBatch], torch.Tensor] | None = None

    def prepare(self, scheduled: list[ScheduledRequest]) -> ForwardBatch:
        token_ids, context_lens, tables, slots = [], [], [], []
        for s in scheduled:
            r = s.request
            token_ids.append(r.all_token_ids[s.context_len: s.context_len + s.num_new_tokens])
            context_lens.append(s.context_len)
            tables.append(r.block_ids)
            slots.append(r.state_slot)
        return ForwardBatch.build(token_ids, context_lens, tables, slots, self.block_size, self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """hidden [T, hidden]; writes the batch's KV and GDN states into the cache."""
        if batch.is_decode and self.decode_forward is not None:
            return self.decode_forward(batch)
        return self.model(batch, self.cache)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> StepResult | None:
        """Run one step; None when no chunk ends a sequence. Each sampled request brings its SamplingRow."""
        if not scheduled:
            return None
        batch = self.prepare(scheduled)
        hidden = self.forward(batch)                                   # [T, hidden]
        last = [i for i, s in enumerate(scheduled) if s.is_last_chunk]
        if not last:
            return None
        if len(last) == len(scheduled):
            idx = batch.logits_indices
        else:
            idx = batch.logits_indices[torch.tensor(last, device=self.device)]
        logits = self.model.compute_logits(hidden[idx])                # [B', vocab] float32
        requests = [scheduled[i].request for i in last]
        out = self.sampler.sample(logits, [r.sampling_row for r in requests])
        return StepResult(requests, out)
