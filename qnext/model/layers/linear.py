"""Linear layers and the weight representation of each: plain (bf16/fp32) or FP8 block-scaled, plus the scheme
that says which projections of the model are quantized how.

Plain:  weight [out, in] in the model dtype, as in the checkpoint.
FP8:    weight [out, in] float8_e4m3fn + weight_scale_inv [ceil(out/128), ceil(in/128)] float32 (the FP8
        checkpoint's names and layout, so its tensors load as they are); W_real = weight * scale per 128x128 block.
Both keep forward(x) [..., in] -> [..., out] in x.dtype; the FP8 matmul is the "fp8_linear" op (Triton on CUDA,
dequantize + F.linear as the torch reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qnext.ops.quant import FP8_BLOCK, FP8_DTYPE, INT4_GROUPS, Fp8BlockWeight
from qnext.ops.registry import get_op


STACK_ALIGN = 16   # outputs of a plain stacked projection: 32-byte rows in bf16 (see stack_projections)


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    """An uninitialised inference parameter (the loader or a test fills it); works on device="meta"."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantScheme:
    """Resident weight formats: `dense` for the attention / GDN / shared-expert / dense-MLP projections (None or
    "fp8"), `experts` for the routed experts (None, "fp8" or "int4", group-wise along K). Never quantized: router,
    shared_expert_gate, in_proj_ba, embeddings, lm_head, norms, conv (small, or precision-critical)."""
    dense: str | None = None
    experts: str | None = None
    group_size: int = 128              # int4 group along K

    @staticmethod
    def named(name: str | None, cfg=None) -> "QuantScheme":
        """EngineConfig.quantization -> scheme: None (all plain), "fp8" (FP8 everywhere it applies), "int4"
        (4-bit experts, FP8 elsewhere); "int4-bf16" (4-bit experts, plain elsewhere) for comparisons."""
        dense, experts = {None: (None, None), "fp8": ("fp8", "fp8"), "int4": ("fp8", "int4"),
                          "int4-bf16": (None, "int4")}[name]
        return QuantScheme(dense, experts, int4_group(cfg) if experts == "int4" and cfg is not None else 128)

    @property
    def is_plain(self) -> bool:
        return self.dense is None and self.experts is None


def int4_group(cfg) -> int:
    """Largest supported group dividing both reduction dims of the experts (hidden for gate_up, I for down)."""
    for g in sorted(INT4_GROUPS, reverse=True):
        if cfg.hidden_size % g == 0 and cfg.moe_intermediate_size % g == 0:
            return g
    raise ValueError(f"int4 experts need hidden_size ({cfg.hidden_size}) and moe_intermediate_size "
                     f"({cfg.moe_intermediate_size}) divisible by one of {INT4_GROUPS}")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 ops_backend: str = "auto"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ops_backend = ops_backend
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None

    def matmul_weight(self) -> torch.Tensor:
        """The weight as the projection ops take it (fused ops that end in this projection)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return get_op("linear", self.ops_backend, x.device)(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 ops_backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = empty_param(out_features, in_features, dtype=FP8_DTYPE, device=device)
        self.weight_scale_inv = empty_param(cdiv(out_features, FP8_BLOCK), cdiv(in_features, FP8_BLOCK),
                                            dtype=torch.float32, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None
        # the Triton kernels take 128-multiples and 16-bit activations; others (tiny test models) use the reference
        aligned = in_features % FP8_BLOCK == 0 and out_features % FP8_BLOCK == 0
        self.ops_backend = ops_backend if aligned and dtype in (torch.bfloat16, torch.float16) else "torch"

    def quant_weight(self) -> Fp8BlockWeight:
        return Fp8BlockWeight(self.weight, self.weight_scale_inv, FP8_BLOCK)

    matmul_weight = quant_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return get_op("fp8_linear", self.ops_backend, x.device)(x, self.quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block {FP8_BLOCK}"


def make_linear(in_features: int, out_features: int, *, quant: str | None = None, ops_backend: str = "auto",
                **kw) -> nn.Module:
    """A projection in the given format (None: plain, "fp8": block-scaled)."""
    if quant is None:
        return Linear(in_features, out_features, ops_backend=ops_backend, **kw)
    if quant == "fp8":
        return Fp8Linear(in_features, out_features, ops_backend=ops_backend, **kw)
    raise ValueError(f"unknown dense quantization {quant!r} (fp8)")


def stack_projections(projs: list[nn.Module]) -> nn.Module | None:
    """One projection whose output is `projs`' outputs side by side ([..., sum of out_features]), for an inference
    engine: a decode step then makes one GEMV launch instead of several small ones. The weights (and FP8 scales)
    are stacked along `out` once; each original keeps views into the stacked tensors, so no second copy exists and
    state_dict is unchanged. Call it once the weights are final: the result is not a submodule (named_parameters,
    state_dict and .to() do not see it). None, and the projections stay apart, when formats, dtypes or inputs
    differ, when one has a bias, or for FP8 when an out size is not a multiple of the 128-row scale block.
    A plain stack is padded with zero rows to a multiple of STACK_ALIGN outputs: an odd width (the router's 512 +
    the shared-expert gate's 1) leaves cuBLAS's output rows unaligned, and it then falls back to a slow sm75
    kernel (H200, 8K-token prefill: 12 ms of the step in 48 router GEMMs; at 32 rows 9.5 us against ~3). The
    padded rows are computed and dropped: `split_stacked` gives each projection's outputs back as views."""
    first = projs[0]
    if (len({type(p) for p in projs}) != 1 or type(first) not in (Linear, Fp8Linear)
            or any(p.bias is not None for p in projs) or len({p.in_features for p in projs}) != 1
            or len({p.weight.dtype for p in projs}) != 1 or len({p.weight.device for p in projs}) != 1):
        return None
    fp8 = isinstance(first, Fp8Linear)
    if fp8 and any(p.out_features % FP8_BLOCK for p in projs):
        return None
    parts = tuple(p.out_features for p in projs)
    pad = 0 if fp8 else -sum(parts) % STACK_ALIGN
    names = ("weight", "weight_scale_inv") if fp8 else ("weight",)
    stacked = (Fp8Linear(first.in_features, sum(parts), device="meta") if fp8
               else Linear(first.in_features, sum(parts) + pad, device="meta"))
    stacked.parts = parts
    stacked.ops_backend = first.ops_backend
    for name in names:
        full = torch.cat([getattr(p, name).data for p in projs])
        if pad:
            full = torch.cat([full, full.new_zeros(pad, full.shape[1])])
        setattr(stacked, name, nn.Parameter(full, requires_grad=False))
        start = 0
        for p in projs:
            n = getattr(p, name).shape[0]
            setattr(p, name, nn.Parameter(full[start:start + n], requires_grad=False))
            start += n
    return stacked


def fusable_weight(proj: nn.Module, ops_backend: str) -> torch.Tensor | Fp8BlockWeight | None:
    """proj's weight for a fused op that makes its projection (a plain or FP8 Linear without a bias, on
    ops_backend), else None."""
    if type(proj) not in (Linear, Fp8Linear) or proj.bias is not None or proj.ops_backend != ops_backend:
        return None
    return proj.matmul_weight()


def project_pair(x: torch.Tensor, first: nn.Module, second: nn.Module,
                 conv: tuple | None = None) -> tuple[torch.Tensor, ...] | None:
    """(first(x), second(x)) through the "linear_pair" op (one GEMV launch for decode rows on CUDA), or None when
    the two cannot share it (a bias, another module type, different ops backends): then call them apart.
    conv: the GDN layer's decode conv of first(x) (conv weight, conv cache, slots, has_initial_state, x_cols,
    x_chans): the "linear_pair_conv_update_" op, whose third output is the conv's (in the same launch on CUDA)."""
    backend = getattr(first, "ops_backend", None)
    weights = fusable_weight(first, backend), fusable_weight(second, backend)
    if weights[0] is None or weights[1] is None:
        return None
    if conv is None:
        return get_op("linear_pair", backend, x.device)(x, *weights)
    return get_op("linear_pair_conv_update_", backend, x.device)(x, *weights, *conv)


def split_stacked(stacked: nn.Module, y: torch.Tensor) -> list[torch.Tensor]:
    """y = stacked(x) [..., out] -> each stacked projection's outputs, as views (padding dropped)."""
    return list(y[..., :sum(stacked.parts)].split(stacked.parts, dim=-1))
