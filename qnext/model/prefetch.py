"""Which weight each latency-bound decode kernel pulls into L2 ahead of use (mechanism: qnext/ops/l2_prefetch.py).

Only in steps of at most MAX_TOKENS rows: there the short kernels between two projections leave memory idle, and
each projection otherwise streams its weights while the whole chain waits. In larger steps the experts' weights
keep memory busy and a prefetch only reorders reads. The links (a kernel starts its idle stretch, the weight it
pulls is read at the stretch's end):
    GDN layer:        the conv step                      -> its out_proj
    attention layer:  q's norm + rope                    -> its o_proj
    MoE block:        routing (NEXT_FROM = "route"), or the post-attention norm ("norm")
                                                         -> the next layer's first projection
The MoE link is made by link_layers (engines call it through stack_projections, once the weights are final).
"""

from __future__ import annotations

import torch
from torch import nn

MAX_TOKENS = 8
NEXT_FROM = "route"


def hint(weight: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """weight, when a step of `tokens` rows should prefetch it; else None."""
    return weight if weight is not None and tokens <= MAX_TOKENS else None


def first_weight(mixer: nn.Module) -> torch.Tensor | None:
    """The weight a layer's mixer reads first: the GDN's in_proj_qkvz, attention's stacked (or separate) q_proj."""
    proj = getattr(mixer, "in_proj_qkvz", None)
    if proj is None:
        proj = getattr(mixer, "qkv_proj", None) or getattr(mixer, "q_proj", None)
    return None if proj is None else proj.weight.data


def link_layers(layers: nn.ModuleList) -> None:
    """Each layer's next_weight (not a parameter): the first weight of the layer after it (None for the last)."""
    for layer, nxt in zip(layers, list(layers[1:]) + [None]):
        object.__setattr__(layer, "next_weight", None if nxt is None else first_weight(nxt.mixer))
