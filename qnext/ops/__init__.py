"""Kernels: a torch reference for each op (the CPU test oracle) plus fast paths chosen through registry.py."""

from qnext.ops.registry import OPS, available, get_op, register, resolve_backend

__all__ = ["OPS", "available", "get_op", "register", "resolve_backend"]
