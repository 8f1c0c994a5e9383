"""Programmatic dependent launch (PDL, Hopper and newer) for the decode step's Triton kernels.

Why: a batch-1 decode step is ~820 short kernels (3.21 ms on the H200 without PDL, 2.76 with it;
docs/benchmarks.md), and between two kernels of a CUDA graph the GPU drains the first grid, then launches and
ramps up the second. With PDL a kernel is launched while its predecessor still runs: its programs start, wait in
`griddepcontrol.wait` until the predecessor has finished and its writes are visible, and only then touch memory.

Contract for a kernel launched with `**pdl_launch()`: it takes `PDL: tl.constexpr` and calls
`pdl_wait_then_release(PDL)` before its first load or store. Because every such kernel waits for its predecessor
to complete before it can itself complete, completion stays transitive along the stream: after the wait, every
earlier kernel (PDL or not) has finished. A kernel launched without the flag behaves as always. `release` lets
the next kernel launch as soon as every program of this one has started; its programs then wait in turn.

QNEXT_PDL=0 turns it off (A/B runs); it is off without CUDA, before sm_90, under Triton's CPU interpreter, and on
Triton builds without the launch option.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def pdl_enabled() -> bool:
    if os.environ.get("QNEXT_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")
    except (ImportError, AttributeError):
        return False


@contextlib.contextmanager
def pdl_disabled():
    """PDL off inside the block (A/B runs, tests): kernels launched there take the plain path."""
    saved = os.environ.get("QNEXT_PDL")
    os.environ["QNEXT_PDL"] = "0"
    pdl_enabled.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("QNEXT_PDL")
        else:
            os.environ["QNEXT_PDL"] = saved
        pdl_enabled.cache_clear()


def pdl_launch() -> dict:
    """Keyword arguments for a kernel launch: the kernel's PDL constexpr and Triton's launch flag."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled() else {"PDL": False}


@triton.jit
def pdl_wait_then_release(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
