"""Block FP8 (e4m3) weights as in Qwen's -FP8 checkpoints.

config.json `quantization_config`: quant_method "fp8", fmt "e4m3", activation_scheme "dynamic",
weight_block_size [b0, b1] (128, 128), modules_to_not_convert (modules kept in bf16).
A quantized weight W [..., R, C] (float8_e4m3fn) travels with a float scale S [..., ceil(R/b0), ceil(C/b1)] named
`<module>.weight_scale_inv` (DeepSeek/Qwen naming; `weight_scale` is accepted as the same thing):
    W_real[r, c] = W[r, c] * S[r // b0, c // b1]
For now the loader dequantizes to the model dtype; a later GPU path keeps W and S resident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qnext.weights.safetensors_reader import WeightError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")  # preferred first


@dataclass(frozen=True)
class Fp8Format:
    block: tuple[int, int] = (128, 128)
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, qcfg: dict | None) -> "Fp8Format | None":
        """From config.json's quantization_config (None when absent); unsupported schemes raise WeightError."""
        if not qcfg:
            return None
        method = qcfg.get("quant_method")
        if method != "fp8":
            raise WeightError(f"quantization_config.quant_method {method!r} is not supported "
                              f"(supported: fp8 with 2-D block scales)")
        fmt = qcfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise WeightError(f"quantization_config.fmt {fmt!r} is not supported (supported: e4m3)")
        scheme = qcfg.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise WeightError(f"quantization_config.activation_scheme {scheme!r} is not supported "
                              f"(supported: dynamic; qnext quantizes activations itself)")
        block = qcfg.get("weight_block_size")
        if not block or len(block) != 2 or min(block) < 1:
            raise WeightError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r} "
                              f"(per-tensor FP8 is not supported)")
        skip = qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers") or ()
        return cls(block=(int(block[0]), int(block[1])), modules_to_not_convert=tuple(skip))

    def converts(self, module: str) -> bool:
        """False when `module` (e.g. model.layers.0.linear_attn.in_proj_ba) is listed as kept unquantized.
        An entry matches a whole dotted run of the name: an exact module, a prefix, or a bare leaf name."""
        dotted = f".{module}."
        return not any(f".{entry}." in dotted for entry in self.modules_to_not_convert)

    def to_config(self) -> dict:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.block), "modules_to_not_convert": list(self.modules_to_not_convert)}


def scale_names(weight_name: str) -> list[str]:
    """Possible names of the scale of `weight_name`, preferred first."""
    if weight_name.endswith(".weight"):
        stem = weight_name[: -len("weight")]
        return [stem + s for s in SCALE_SUFFIXES]
    return [f"{weight_name}_scale_inv", f"{weight_name}_scale"]  # fused parameters without a .weight leaf


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def check_scale(name: str, shape: tuple[int, ...], s_shape: tuple[int, ...], block: tuple[int, int]) -> None:
    if len(shape) < 2:
        raise WeightError(f"FP8 tensor {name} has shape {list(shape)}; block FP8 needs a matrix")
    want = scale_shape(shape, block)
    if tuple(s_shape) != want:
        raise WeightError(f"scale of FP8 tensor {name} has shape {list(s_shape)}, expected {list(want)} "
                          f"for weight {list(shape)} with blocks {list(block)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q [..., R, C] fp8, scale [..., ceil(R/b0), ceil(C/b1)] -> [..., R, C] in `dtype` (fp32 math, q's device)."""
    R, C = q.shape[-2:]
    s = scale.to(device=q.device, dtype=torch.float32)
    s = s.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :R, :C]
    return (q.to(torch.float32) * s).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> (q [..., R, C] float8_e4m3fn, scale_inv [..., ceil(R/b0), ceil(C/b1)] float32),
    one scale per block = block amax / 448, so every block uses the full e4m3 range."""
    R, C = w.shape[-2:]
    b0, b1 = block
    r, c = math.ceil(R / b0), math.ceil(C / b1)
    x = torch.nn.functional.pad(w.to(torch.float32), (0, c * b1 - C, 0, r * b0 - R))
    x = x.reshape(*w.shape[:-2], r, b0, c, b1)
    amax = x.abs().amax(dim=(-3, -1))                                   # [..., r, c]
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (x / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*w.shape[:-2], r * b0, c * b1)[..., :R, :C].contiguous()
    return q, scale
