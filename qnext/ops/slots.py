"""Gather per-sequence states from a slot-indexed cache: the torch references' side of the in-place fast paths."""

from __future__ import annotations

import torch


def slot_states(cache: torch.Tensor, slots: torch.Tensor, has_initial_state: torch.Tensor | None) -> torch.Tensor:
    """cache [num_slots, ...] -> a copy of rows `slots` [N, ...], zeroed where has_initial_state [N] is false
    (None: all true)."""
    state = cache.index_select(0, slots)
    if has_initial_state is not None:
        state = state.masked_fill(~has_initial_state.view(-1, *[1] * (state.dim() - 1)), 0)
    return state
