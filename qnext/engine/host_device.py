"""Host <-> device copies for the step loop that never wait for queued GPU work needlessly.

A plain `torch.tensor(host_list, device="cuda")` copies from pageable memory with a blocking copy, which waits
for every kernel already queued on the stream (a host sync); after the forward has been queued that stalls the
CPU until the forward ends. `to_device` stages the data in pinned memory and copies it asynchronously instead,
so the step's small index/parameter tensors can be made at any point of the step. `to_host` brings several
results back with one wait.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list (nested lists allowed) as a tensor on `device`; no host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    # The caching host allocator keeps the pinned block until the copy has run, so it may be dropped at once.
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[list]:
    """`.tolist()` of each tensor, waiting once for the device (not once per tensor)."""
    if not tensors or all(t.device.type != "cuda" for t in tensors):
        return [t.tolist() for t in tensors]
    staged = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [t.tolist() for t in staged]
