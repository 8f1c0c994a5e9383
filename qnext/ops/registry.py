"""Op registry: each op has a "torch" reference backend; GPU backends are imported lazily from BACKEND_MODULES.

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
    "gdn_prefill_",                # GDN gates + chunked rule, state in place at cache slots (what the layer calls)
    "gdn_decode_",                 # GDN gates + recurrent step, state in place at cache slots (what the layer calls)
    "causal_conv1d",               # varlen causal depthwise conv + SiLU with conv state
    "causal_conv1d_update",        # one-token conv step
    "paged_attention",             # write K/V at slot_mapping, attend over the paged cache
    "fused_moe",                   # routed experts, bf16 / fp8 block / int4 group weights
    "fp8_linear",                  # FP8 block-scaled dense projection
    "linear",                      # plain (16-bit / float32) projection; a GEMV kernel for decode rows on CUDA
    "causal_conv1d_prefill_",      # causal_conv1d with the state in place at cache slots (what the GDN layer calls)
    "causal_conv1d_update_",       # causal_conv1d_update with the state in place at cache slots
    "rmsnorm",                     # zero-centred RMSNorm, optionally fused with the residual add
    "gated_rmsnorm",               # GDN output norm gated by silu(z)
    "rmsnorm_rope",                # attention q/k norm + partial rotary embedding
    "rope_cos_sin",                # the rotary embedding's cos / sin at the step's positions
    "rmsnorm_rope_pair",           # attention's q and k norm + rotary embedding (one launch for decode on CUDA)
    "moe_route",                   # router softmax + top-k + renormalise
    "silu_mul",                    # SwiGLU activation
    "sigmoid_gate_add",            # y + sigmoid(gate) * shared expert
    "silu_mul_linear",             # a projection of silu_mul's output (the GEMV forms it on CUDA)
    "linear_pair",                 # two projections of one input (one GEMV launch on CUDA)
    "silu_mul_linear_route",       # silu_mul_linear beside moe_route (one launch for decode rows on CUDA)
    "linear_pair_conv_update_",    # linear_pair, then causal_conv1d_update_ of the first output (one launch on CUDA)
    "gdn_decode_project_",         # gdn_decode_, the gated RMSNorm and out_proj (the GEMV forms the norm on CUDA)
    "greedy_argmax",               # the first index of each logits row's maximum (the sampler's greedy rows)
)

# Modules that provide a backend's ops. A module provides an op by defining a function named after it (same
# signature as the torch reference), by registering on import, or from register_backend(name), which is called.
# A module that fails to import (no GPU packages) is skipped; a backend none of whose modules import is unavailable.
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("qnext.ops.delta_rule", "qnext.ops.causal_conv", "qnext.ops.paged_attention", "qnext.ops.moe",
              "qnext.ops.fp8_linear", "qnext.ops.norm"),
    "triton": ("qnext.ops.fla_gdn", "qnext.ops.triton_conv1d", "qnext.ops.triton_paged_attention",
               "qnext.ops.triton_moe", "qnext.ops.triton_linear_fp8", "qnext.ops.triton_norm",
               "qnext.ops.triton_ffn", "qnext.ops.triton_fused_linear", "qnext.ops.triton_sampling"),
    "fla": ("qnext.ops.fla_gdn",),
}
AUTO_ORDER = ("triton", "fla")  # preference on CUDA; CPU always gets "torch"

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
        ok = False
        for name in BACKEND_MODULES[backend]:
            try:
                module = importlib.import_module(name)
                if hasattr(module, "register_backend"):
                    module.register_backend(backend)
            except Exception as e:  # a missing GPU package or a GPU-less machine
                log.info("ops backend %s: %s unavailable: %s", backend, name, e)
                continue
            for op in OPS:
                if callable(getattr(module, op, None)):
                    _impls.setdefault((op, backend), getattr(module, op))
            ok = True
        _loaded[backend] = ok
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
