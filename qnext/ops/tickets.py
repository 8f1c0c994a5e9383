"""Ticket counters for kernels whose last program to finish a piece of work does its final step (split-K fix-up,
the decode attention's split merge): int32, zero between calls (each piece's last program puts its own back to 0).

Contract for a kernel that takes one: its programs write their partials, `tl.debug_barrier()` (every thread's
writes before the ticket), then `tl.atomic_add(cnt + piece, 1, sem="acq_rel")`; the program that draws the last
ticket reads the partials through L2 (`cache_modifier=".cg"` or volatile: another SM wrote them, and this SM's L1
may hold an older copy of those addresses from an earlier call), writes the result and stores 0 back.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

_TICKETS: dict[tuple[torch.device, int], Tensor] = {}
TICKETS = 1 << 16                           # counters per stream (the most pieces one call may use)


def tickets(device: torch.device) -> Tensor:
    """The counters of the current stream (one buffer per stream, so calls on two streams, a side branch, never
    share a counter). A buffer first made inside a CUDA-graph capture (its stream is the capture stream) comes
    from the graph's pool and its zeroing becomes a node of the graph, ahead of the kernels that use it: still zero
    at every replay."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    t = _TICKETS.get((device, stream))
    if t is None:
        t = _TICKETS[(device, stream)] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return t
