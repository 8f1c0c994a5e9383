"""CUDA graphs of the model forward for decode-only steps (every sequence feeds one token).

One graph per bucket batch size (1, 2, 4, 8, ... up to max_num_seqs), captured largest first into one shared
memory pool, each reading static input buffers sized for the largest bucket:
    input_ids, positions, slot_mapping [Bmax] int64; seq_lens [Bmax] int32; block_tables [Bmax, max_blocks] int32;
    state_slots [Bmax] int64; has_initial_state [Bmax] bool; cu_query_lens [Bmax + 1] int32 (= arange)
and writing hidden [bucket, hidden]. A step with B sequences copies its tensors into rows [0, B) and replays the
smallest bucket >= B; rows [B, bucket) are padding that reads and writes only the cache's dummy page and dummy
state slot (reserved by the cache plan, never handed to a request), with seq_len 1 and no initial state.
Captured with context_lens = max_model_len - 1, so the attention decode splits its work for the longest context
any request can reach (a host choice fixed per graph); the kernels read the real lengths from seq_lens.
The captured forward must be free of host syncs and of Python branches on tensor values (the ops are written so).
"""

from __future__ import annotations

import logging
import time

import torch

from qnext.cache.model_cache import ModelCache
from qnext.engine.forward_batch import ForwardBatch

log = logging.getLogger("qnext.engine")


# Buckets from this batch size up take the side stream (H200, scripts/gpu_e2e.py --extras knobs, with PDL): one
# stream replays b1 in 2.84 ms against 2.89 with the branches, which win from b2 on (3.86 against 4.07 ms; b8 6.63
# against 6.90, b32 11.45 against 11.82).
SIDE_STREAM_MIN_BATCH = 2


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, 64, 80, ... (steps of 16 past 32) up to max_num_seqs, which is always included."""
    sizes, b = [], 1
    while b < min(max_num_seqs, 32):
        sizes.append(b)
        b *= 2
    b = 32
    while b < max_num_seqs:
        sizes.append(b)
        b += 16
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, max_num_seqs: int, max_model_len: int,
                 dummy_page: int, dummy_slot: int, side_stream: "torch.cuda.Stream | None" = None):
        self.model, self.cache = model, cache
        self.side_stream = side_stream         # parallel branches of the graphs from SIDE_STREAM_MIN_BATCH up
        self.block_size = cache.block_size
        self.max_model_len = max_model_len
        self.dummy_page, self.dummy_slot = dummy_page, dummy_slot
        self.buckets = bucket_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // self.block_size)
        n, dev = self.buckets[-1], cache.device
        i64 = dict(dtype=torch.int64, device=dev)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), dummy_page * self.block_size, **i64)
        self.state_slots = torch.full((n,), dummy_slot, **i64)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, self.max_blocks), dummy_page, dtype=torch.int32, device=dev)
        self.has_initial_state = torch.zeros(n, dtype=torch.bool, device=dev)
        self.cu_query_lens = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, **i64)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _static_batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], query_lens=[1] * b,
            context_lens=[self.max_model_len - 1] * b, cu_query_lens=self.cu_query_lens[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
            state_slots=self.state_slots[:b], has_initial_state=self.has_initial_state[:b],
            logits_indices=self.logits_indices[:b], block_size=self.block_size,
            side_stream=self.side_stream if b >= SIDE_STREAM_MIN_BATCH else None)

    @torch.inference_mode()
    def capture(self) -> None:
        start, pool = time.perf_counter(), None
        for b in reversed(self.buckets):                       # largest first: the smaller ones reuse its pool
            batch = self._static_batch(b)
            side = torch.cuda.Stream(self.cache.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                      # warm-up: compiles kernels, fills lazy caches
                self.model(batch, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(batch, self.cache)            # [b, hidden]
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.cache.device)
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.buckets,
                 time.perf_counter() - start)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.num_seqs <= self.buckets[-1] and batch.block_tables.shape[1] <= self.max_blocks

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """hidden [B, hidden] of a decode-only batch (a view into the graph's output, valid until the next call)."""
        if not self.can_run(batch):
            return self.model(batch, self.cache)
        b = batch.num_seqs
        bucket = next(s for s in self.buckets if s >= b)
        width = batch.block_tables.shape[1]
        # the int64 inputs as one multi-tensor copy, the int32 ones as another (one kernel each on CUDA where the
        # slices are dense, as a batch-1 step's are; else torch copies them one by one)
        torch._foreach_copy_([self.input_ids[:b], self.positions[:b], self.slot_mapping[:b], self.state_slots[:b]],
                             [batch.input_ids, batch.positions, batch.slot_mapping, batch.state_slots])
        torch._foreach_copy_([self.seq_lens[:b], self.block_tables[:b, :width]], [batch.seq_lens, batch.block_tables])
        self.has_initial_state[:b].copy_(batch.has_initial_state)
        if bucket > b:                                         # padding rows: dummy page and slot only
            self.slot_mapping[b:bucket].fill_(self.dummy_page * self.block_size)
            self.state_slots[b:bucket].fill_(self.dummy_slot)
            self.seq_lens[b:bucket].fill_(1)
            self.has_initial_state[b:bucket].fill_(False)
            self.block_tables[b:bucket, 0].fill_(self.dummy_page)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]
