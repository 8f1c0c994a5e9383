"""ForwardBatch: everything one model step needs about its B sequences, built on the model's device.

One flat batch: sequence i contributes q_len_i >= 1 new tokens (a prefill chunk or one decode token) that
continue the context_len_i tokens already in its KV pages and GDN state slot. No prefill/decode phases.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from qnext.engine.host_device import pack_to_device

Tensor = torch.Tensor


@dataclass
class ForwardBatch:
    input_ids: Tensor          # [T] int64, tokens of all sequences back to back
    positions: Tensor          # [T] int64, absolute position of each token
    query_lens: list[int]      # [B] host ints, q_len_i
    context_lens: list[int]    # [B] host ints, tokens already in the cache before this step
    cu_query_lens: Tensor      # [B+1] int32 on device
    seq_lens: Tensor           # [B] int32, context_lens + query_lens (keys visible to the last query)
    block_tables: Tensor       # [B, max_blocks] int32, KV page ids (padding = 0, never read past seq_len)
    slot_mapping: Tensor       # [T] int64, flat KV slot (page * block_size + offset) each new token is written to
    state_slots: Tensor        # [B] int64, GDN state slot of each sequence
    has_initial_state: Tensor  # [B] bool, context_lens > 0 (else the GDN state starts at zero)
    logits_indices: Tensor     # [B] int64, index into T of each sequence's last token
    block_size: int
    # a second CUDA stream for work a layer can run beside its main chain (qnext/model/side_stream.py); set by
    # the decode CUDA graphs; None: everything on the current stream (eager steps, CPU, no_side_stream)
    side_stream: "torch.cuda.Stream | None" = None

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    # ---- builders (host lists -> device tensors) ---------------------------------------------------
    @staticmethod
    def build(token_ids: list[list[int]], context_lens: list[int], block_tables: list[list[int]],
              state_slots: list[int], block_size: int, device: torch.device | str = "cpu") -> "ForwardBatch":
        """General step: token_ids[i] are sequence i's new tokens, continuing its context_lens[i] cached ones;
        block_tables[i] must cover context_lens[i] + len(token_ids[i]) tokens."""
        if not (len(token_ids) == len(context_lens) == len(block_tables) == len(state_slots)):
            raise ValueError("token_ids, context_lens, block_tables and state_slots need one entry per sequence")
        query_lens = [len(t) for t in token_ids]
        if any(n < 1 for n in query_lens):
            raise ValueError(f"every sequence needs at least one new token, got query_lens {query_lens}")
        flat, positions, slots, cu = [], [], [], [0]
        for toks, ctx, pages in zip(token_ids, context_lens, block_tables):
            end = ctx + len(toks)
            if len(pages) * block_size < end:
                raise ValueError(f"{len(pages)} pages of {block_size} cannot hold {end} tokens")
            flat.extend(toks)
            positions.extend(range(ctx, end))
            slots.extend(pages[p // block_size] * block_size + p % block_size for p in range(ctx, end))
            cu.append(cu[-1] + len(toks))
        width = max(len(p) for p in block_tables)
        table = array("i")
        for p in block_tables:
            table.extend(p)
            if len(p) < width:
                table.frombytes(bytes(4 * (width - len(p))))  # zero pages past the sequence's own
        i64, i32 = torch.int64, torch.int32
        # one pinned buffer, one asynchronous copy on CUDA: no wait for the previous step
        (input_ids, positions, cu_t, seq_lens, tables, slot_mapping, slots_t, has_init,
         logits_indices) = pack_to_device([
            (flat, i64), (positions, i64), (cu, i32), ([c + n for c, n in zip(context_lens, query_lens)], i32),
            (table, i32), (slots, i64), (state_slots, i64), ([c > 0 for c in context_lens], torch.bool),
            ([c - 1 for c in cu[1:]], i64)], device)
        return ForwardBatch(
            input_ids=input_ids, positions=positions, query_lens=query_lens, context_lens=list(context_lens),
            cu_query_lens=cu_t, seq_lens=seq_lens, block_tables=tables.view(len(block_tables), width),
            slot_mapping=slot_mapping, state_slots=slots_t, has_initial_state=has_init,
            logits_indices=logits_indices, block_size=block_size,
        )

    @staticmethod
    def for_prompts(prompts: list[list[int]], block_size: int = 16, device: torch.device | str = "cpu",
                    max_len: int | None = None) -> "ForwardBatch":
        """Tests/offline: fresh sequences, whole prompts; sequence i gets state slot i and consecutive pages
        [i * P, (i + 1) * P), P = pages for max(max_len, its prompt length) tokens (room to decode into)."""
        longest = max([len(p) for p in prompts] + [max_len or 0])
        per_seq = (longest + block_size - 1) // block_size
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
        return ForwardBatch.build(prompts, [0] * len(prompts), tables, list(range(len(prompts))), block_size, device)

    def next_decode(self, next_token_ids: list[int]) -> "ForwardBatch":
        """The decode step that follows this batch: one new token per sequence, same pages and state slots.
        The block table rows are reused as they are, so they must already cover the new token."""
        if len(next_token_ids) != self.num_seqs:
            raise ValueError(f"need {self.num_seqs} tokens, got {len(next_token_ids)}")
        seq_lens = [c + n for c, n in zip(self.context_lens, self.query_lens)]
        return ForwardBatch.for_decode(next_token_ids, seq_lens, self.block_tables.tolist(),
                                       self.state_slots.tolist(), self.block_size, self.input_ids.device)

    @staticmethod
    def for_decode(token_ids: list[int], context_lens: list[int], block_tables: list[list[int]],
                   state_slots: list[int], block_size: int, device: torch.device | str = "cpu") -> "ForwardBatch":
        """One decode token per sequence."""
        return ForwardBatch.build([[t] for t in token_ids], context_lens, block_tables, state_slots,
                                  block_size, device)
