"""qnext: a fast inference server for Qwen3-Coder-Next.

`from qnext import LLM, SamplingParams` is lazy: importing qnext does not import torch until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

if TYPE_CHECKING:
    from qnext.llm import LLM
    from qnext.sampling_params import CompletionOutput, RequestOutput, SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from qnext.llm import LLM
        return LLM
    if name in ("SamplingParams", "RequestOutput", "CompletionOutput"):
        from qnext import sampling_params
        return getattr(sampling_params, name)
    raise AttributeError(f"module 'qnext' has no attribute {name!r}")
