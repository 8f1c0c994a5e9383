"""Host <-> device copies for the step loop that never wait for queued GPU work needlessly.

A plain `torch.tensor(host_list, device="cuda")` copies from pageable memory with a blocking copy, which waits
for every kernel already queued on the stream (a host sync); after the forward has been queued that stalls the
CPU until the forward ends. `to_device` stages the data in pinned memory and copies it asynchronously instead,
so the step's small index/parameter tensors can be made at any point of the step. `to_host` brings several
results back with one wait.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch


def to_device(data: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list (nested lists allowed) as a tensor on `device`; no host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    # The caching host allocator keeps the pinned block until the copy has run, so it may be dropped at once.
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


# array typecodes of the dtypes the step loop packs (bool as bytes of 0/1)
_TYPECODES = {torch.int64: "q", torch.int32: "i", torch.int16: "h", torch.uint8: "B", torch.bool: "B",
              torch.float64: "d", torch.float32: "f"}


def pack_to_device(parts: Sequence[tuple[Sequence, torch.dtype]], device: torch.device | str) -> list[torch.Tensor]:
    """Several flat (1-D) host lists as 1-D tensors of their dtypes on `device`, built as one host buffer: each part
    through `array` (a C loop; torch.tensor(list) costs ~10 us even for a few ints, ~90 of a step's ~250 us of
    host time at batch 1), 8-byte aligned so every dtype can view its span; on CUDA one pinned staging buffer and
    one asynchronous copy (a step's ~9 small tensors would each cost a pinned allocation and a copy launch)."""
    device = torch.device(device)
    buf, spans = bytearray(), []
    for data, dtype in parts:
        start = len(buf)
        buf += array(_TYPECODES[dtype], data).tobytes()
        spans.append((start, len(buf), dtype))
        buf += bytes(-len(buf) % 8)
    host = torch.frombuffer(buf or bytearray(8), dtype=torch.uint8)   # never a zero-size pinned copy
    if device.type == "cuda":
        staging = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=True)
        staging.copy_(host)
        host = staging.to(device, non_blocking=True)
    elif device.type != "cpu":
        host = host.to(device)
    return [host[a:b].view(dtype) for a, b, dtype in spans]


class HostCopy:
    """Device tensors on their way to pinned host memory. `wait()` waits for these copies alone (a CUDA event), not
    for work queued on the stream after them (the next step, when the engine overlaps), and returns their
    `.tolist()`s."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.event = None
        if not any(t.device.type == "cuda" for t in tensors):
            self.host = list(tensors)
            return
        # pinned destinations: a copy into pageable memory would block the host until the stream drains
        self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(self.host, tensors):
            h.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()
        return [t.tolist() for t in self.host]


def to_host(*tensors: torch.Tensor) -> list[list]:
    """`.tolist()` of each tensor, waiting once for the device (not once per tensor)."""
    return HostCopy(tensors).wait()
