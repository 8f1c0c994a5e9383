"""qnext: a fast inference server for Qwen3-Coder-Next."""

__version__ = "0.1.0"
