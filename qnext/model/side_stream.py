"""Independent work of a layer run beside the main CUDA stream (the shared expert beside the router and routed
experts, GDN's small in_proj_ba beside in_proj_qkvz).

A decode step at small batch is latency bound: each small kernel leaves most of the GPU idle, so a second stream
lets two such chains overlap. Inside a CUDA-graph capture the fork and join become graph edges (parallel
branches); eagerly they are event waits. Without a stream (the engine passes one to its decode graphs only: eager
steps, CPU and `no_side_stream` get None) the branch runs inline, so results never depend on it: the same kernels
run on the same inputs either way.

    with SideBranch(batch.side_stream) as side:
        shared = self.shared_expert(x)       # queued on the side stream, after everything queued before
    y = main_work(x)                         # main stream, concurrently
    side.join()                              # main waits for the side work before using `shared`

Memory safety: tensors the side work reads were made on the main stream and stay referenced until after join();
tensors it makes are freed on the main stream only after join(), and the next fork waits for the main stream
first, so the caching allocator never hands a block to one stream while the other still uses it.
"""

from __future__ import annotations

import torch


class SideBranch:
    def __init__(self, stream: "torch.cuda.Stream | None"):
        self.stream = stream
        self._main = self._ctx = None

    def __enter__(self) -> "SideBranch":
        if self.stream is not None:
            self._main = torch.cuda.current_stream(self.stream.device)
            self.stream.wait_stream(self._main)
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None

    def join(self) -> None:
        """The main stream waits for the side work queued so far (no-op without a stream)."""
        if self._main is not None:
            self._main.wait_stream(self.stream)
            self._main = None
