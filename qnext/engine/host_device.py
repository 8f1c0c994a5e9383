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


def pack_to_device(parts: Sequence[tuple[Sequence, torch.dtype]], device: torch.device | str) -> list[torch.Tensor]:
    """Several flat (1-D) host lists as 1-D tensors of their dtypes on `device`, through one pinned staging buffer and
    one asynchronous copy on CUDA (a step's ~9 small tensors each cost a pinned allocation and a copy launch of
    their own through `to_device`). Each part starts 8-byte aligned in the buffer, so every dtype can view it."""
    device = torch.device(device)
    if device.type != "cuda":
        return [torch.tensor(data, dtype=dtype, device=device) for data, dtype in parts]
    host = [torch.tensor(data, dtype=dtype) for data, dtype in parts]
    spans, total = [], 0
    for t in host:
        n = t.numel() * t.element_size()
        spans.append((total, total + n))
        total += -(-n // 8) * 8
    staging = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=True)
    for t, (a, b) in zip(host, spans):
        staging[a:b].view(t.dtype).copy_(t)
    on_device = staging.to(device, non_blocking=True)
    return [on_device[a:b].view(t.dtype) for t, (a, b) in zip(host, spans)]


def to_host(*tensors: torch.Tensor) -> list[list]:
    """`.tolist()` of each tensor, waiting once for the device (not once per tensor)."""
    if not tensors or all(t.device.type != "cuda" for t in tensors):
        return [t.tolist() for t in tensors]
    staged = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [t.tolist() for t in staged]
