"""The Qwen3-Next model (qwen3_next.py), its layers and its cache/state shapes (state.py)."""

from qnext.model.qwen3_next import Qwen3NextForCausalLM

__all__ = ["Qwen3NextForCausalLM"]
