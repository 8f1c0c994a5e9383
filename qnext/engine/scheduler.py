"""Scheduler: continuous batching as plain Python over token counts (no tensors).

One rule (see request.py): each step a request is given up to `num_tokens - num_computed_tokens` tokens, plus
the token a step still on the device is sampling for it (`num_inflight`), unless that one is its last.
A step's token budget (`max_num_batched_tokens`) is filled in this order:
  1. running requests that are decoding (one token each), oldest first;
  2. running requests still in prefill (a chunk each, as much as the budget leaves);
  3. waiting requests, front first, while `max_num_seqs`, KV pages and GDN slots allow (a chunk each).
KV pages are allocated as a step needs them. When a running request cannot get its pages, the most recently
admitted running request is preempted (pages and slot freed, num_computed_tokens reset to 0, put back at the
front of the waiting queue; it recomputes prompt + outputs later). A step that preempts admits nobody.

Limits checked at add_request (ValueError, a permanent 400): prompt + max_tokens must fit max_model_len and the
whole page pool. `max_queue` bounds the requests beyond the `max_num_seqs` that can run (QueueFullError, 429).
schedule() advances num_computed_tokens of what it schedules: the step is then owed to the runner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qnext.cache.block_pool import BlockPool
from qnext.cache.state_slots import StateSlotPool
from qnext.engine.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is full (server: 429). Retry later."""


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int    # q_len: tokens fed this step
    context_len: int       # tokens already in the cache before this step
    is_last_chunk: bool    # the step reaches the request's current last token: a new token is sampled from it


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)   # decodes first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_pool: BlockPool, slot_pool: StateSlotPool, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_queue: int, max_model_len: int):
        self.pool = block_pool
        self.slots = slot_pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}    # every unfinished request
        self.num_preemptions = 0

    # ---- admission ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Unfinished requests the scheduler accepts: max_num_seqs running + max_queue waiting beyond them."""
        return self.max_num_seqs + self.max_queue

    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError naming the limit when a request can never run."""
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty (need at least one token)")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} tokens "
                             f"exceeds max_model_len ({self.max_model_len})")
        # the last sampled token is never fed back, so the cache holds at most total - 1 tokens
        pages = self.pool.blocks_for_tokens(total - 1)
        if pages > self.pool.num_blocks:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {pages} KV pages "
                             f"but the pool has num_kv_blocks={self.pool.num_blocks} "
                             f"(block_size {self.pool.block_size})")

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.check_request(req.num_prompt_tokens, req.max_tokens)
        if len(self.requests) >= self.capacity:
            raise QueueFullError(f"queue full: {len(self.running)} running, {len(self.waiting)} waiting "
                                 f"(max_num_seqs {self.max_num_seqs} + max_queue {self.max_queue})")
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self.requests[req.request_id] = req

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chosen: dict[str, ScheduledRequest] = {}

        def pending(r: Request) -> int:
            if r.num_inflight and r.num_output_tokens + r.num_inflight >= r.max_tokens:
                return 0     # its token in flight is its last (max_tokens): nothing more to compute
            return r.num_tokens + r.num_inflight - r.num_computed_tokens

        decodes, others = [], []
        for r in self.running:                          # decodes first, then prefill chunks
            (decodes if pending(r) == 1 else others).append(r)
        for req in decodes + others:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(pending(req), budget)
            if n <= 0:  # nothing owed (cannot happen while the engine appends every sampled token)
                continue
            need = self.pool.blocks_for_tokens(req.num_computed_tokens + n) - len(req.block_ids)
            while not self.pool.can_allocate(need):
                victim = self.running[-1]
                if victim.request_id in chosen:  # already given tokens this step: take them back
                    budget += chosen.pop(victim.request_id).num_new_tokens
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            if need > 0:
                req.block_ids += self.pool.allocate(need)
            chosen[req.request_id] = self._chunk(req, n)
            budget -= n

        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.max_num_seqs and self.slots.num_free > 0):
            req = self.waiting[0]
            n = min(pending(req), budget)
            need = self.pool.blocks_for_tokens(req.num_computed_tokens + n)
            if not self.pool.can_allocate(need):
                break
            self.waiting.popleft()
            req.block_ids = self.pool.allocate(need)
            req.state_slot = self.slots.allocate()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen[req.request_id] = self._chunk(req, n)
            budget -= n

        for s in chosen.values():
            s.request.num_computed_tokens += s.num_new_tokens
        out.scheduled = list(chosen.values())
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    @staticmethod
    def _chunk(req: Request, n: int) -> ScheduledRequest:
        return ScheduledRequest(req, n, req.num_computed_tokens,
                                req.num_computed_tokens + n == req.num_tokens + req.num_inflight)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        if req.state_slot is not None:
            self.slots.free(req.state_slot)
            req.state_slot = None

    # ---- finishing ------------------------------------------------------------------------------
    def finish_request(self, req: Request, status: RequestStatus) -> None:
        """Frees the request's pages and slot at once and forgets it."""
        assert status.is_finished, status
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.is_finished:
            self.waiting.remove(req)
        else:
            return
        self._release(req)
        req.status = status
        del self.requests[req.request_id]

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish_request(req, RequestStatus.FINISHED_ABORTED)
        return req

    # ---- introspection --------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def check_integrity(self) -> None:
        """Pools agree with the requests' own pages and slots; every request is in exactly one place."""
        running_ids = [r.request_id for r in self.running]
        waiting_ids = [r.request_id for r in self.waiting]
        assert len(set(running_ids)) == len(running_ids), "a request is running twice"
        assert len(set(waiting_ids)) == len(waiting_ids), "a request is waiting twice"
        assert not set(running_ids) & set(waiting_ids), "a request is both running and waiting"
        assert set(running_ids) | set(waiting_ids) == set(self.requests), "requests table out of step"
        assert len(self.running) <= self.max_num_seqs, "more running requests than max_num_seqs"
        for r in self.running:
            assert r.status is RequestStatus.RUNNING and r.state_slot is not None, r.request_id
            assert 0 < r.num_computed_tokens <= r.num_tokens + r.num_inflight, (
                r.request_id, r.num_computed_tokens, r.num_tokens, r.num_inflight)
            assert len(r.block_ids) == self.pool.blocks_for_tokens(r.num_computed_tokens), (
                f"{r.request_id}: {len(r.block_ids)} pages for {r.num_computed_tokens} computed tokens")
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), r.request_id
            assert not r.block_ids and r.state_slot is None and r.num_computed_tokens == 0, r.request_id
        self.pool.check_integrity({r.request_id: r.block_ids for r in self.running})
        self.slots.check_integrity({r.request_id: r.state_slot for r in self.running})
