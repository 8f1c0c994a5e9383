"""Op registry: each op has a "torch" reference backend; GPU backends register themselves when imported.

    @register("paged_attention", "torch")
    def paged_attention(...): ...

    fn = get_op("paged_attention", backend="auto", device=x.device)

"auto" resolves once per device type (cuda: the first of AUTO_ORDER whose module imports; else "torch") and the
choice is logged. An op a backend lacks falls back to the torch reference (logged once per op and backend).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

OPS = (
    "chunk_gated_delta_rule",      # prefill chunks of the GDN recurrence
    "recurrent_gated_delta_rule",  # token-by-token GDN recurrence (decode)
    "causal_conv1d",               # varlen causal depthwise conv + SiLU with conv state
    "causal_conv1d_update",        # one-token conv step
    "paged_attention",             # write K/V at slot_mapping, attend over the paged cache
)

# Modules that register a backend's ops when imported; a module that fails to import leaves its backend out.
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("qnext.ops.delta_rule", "qnext.ops.causal_conv", "qnext.ops.paged_attention"),
    "fla": ("qnext.ops.fla_backend",),
    "triton": ("qnext.ops.triton_backend",),
}
AUTO_ORDER = ("fla", "triton")  # preference on CUDA; CPU always gets "torch"

_impls: dict[tuple[str, str], Callable] = {}
_loaded: dict[str, bool] = {}
_resolved: dict[tuple[str, str], str] = {}
_fallbacks_logged: set[tuple[str, str]] = set()


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} (known: {', '.join(OPS)})")

    def deco(fn: Callable) -> Callable:
        _impls[(op, backend)] = fn
        return fn
    return deco


def _load(backend: str) -> bool:
    if backend not in _loaded:
        if backend not in BACKEND_MODULES:
            raise ValueError(f"unknown ops backend {backend!r} (known: {', '.join(BACKEND_MODULES)}, auto)")
        try:
            for module in BACKEND_MODULES[backend]:
                importlib.import_module(module)
            _loaded[backend] = True
        except Exception as e:  # a missing GPU package or a GPU-less machine
            log.info("ops backend %s unavailable: %s", backend, e)
            _loaded[backend] = False
    return _loaded[backend]


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """"auto" -> a concrete backend for the device type; an explicit name must load."""
    device_type = torch.device(device).type
    key = (backend, device_type)
    if key not in _resolved:
        if backend == "auto":
            candidates = AUTO_ORDER if device_type == "cuda" else ()
            choice = next((b for b in candidates if _load(b)), "torch")
        elif _load(backend):
            choice = backend
        else:
            raise RuntimeError(f"ops backend {backend!r} could not be loaded (see the log)")
        _load("torch")
        _resolved[key] = choice
        log.info("ops backend for %s: %s (asked %s)", device_type, choice, backend)
    return _resolved[key]


def get_op(op: str, backend: str = "auto", device: torch.device | str = "cpu") -> Callable:
    chosen = resolve_backend(backend, device)
    fn = _impls.get((op, chosen))
    if fn is None:
        if (op, chosen) not in _fallbacks_logged:
            _fallbacks_logged.add((op, chosen))
            log.info("ops backend %s has no %s; using the torch reference", chosen, op)
        fn = _impls[(op, "torch")]
    return fn


def available(op: str) -> list[str]:
    """Backends registered so far for op (tests and `qnext` diagnostics)."""
    return sorted(b for (o, b) in _impls if o == op)
