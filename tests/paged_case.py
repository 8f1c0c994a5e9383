"""A random paged-attention case shared by the GPU tests and the Triton-interpreter checks."""

from __future__ import annotations

import torch


def paged_case(ctx: list[int], qlens: list[int], block_size: int, *, hq: int, hkv: int, d: int,
               num_blocks: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               gated: bool = False) -> dict:
    """Sequences with ctx[i] cached tokens and qlens[i] new ones over randomly placed pages of a random KV cache:
    the keyword arguments of the paged_attention op (q, k, v new; K/V caches; slot_mapping, block_tables,
    seq_lens, query_lens, context_lens, scale; gated: also gate, a strided view as the model passes it).
    num_blocks defaults to the pages needed plus 3."""
    need = sum(-(-(c + n) // block_size) for c, n in zip(ctx, qlens))
    num_blocks = need + 3 if num_blocks is None else num_blocks
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for c, n in zip(ctx, qlens):
        pages = -(-(c + n) // block_size)
        tables.append(perm[used:used + pages])
        used += pages
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    slot = torch.tensor([tables[i][p // block_size] * block_size + p % block_size
                         for i, (c, n) in enumerate(zip(ctx, qlens)) for p in range(c, c + n)], device=device)
    kc = torch.randn(num_blocks, block_size, hkv, d, device=device).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, d, device=device).to(dtype)
    t = sum(qlens)
    q = torch.randn(t, hq, d, device=device).to(dtype)
    k, v = (torch.randn(t, hkv, d, device=device).to(dtype) for _ in range(2))
    seq_lens = torch.tensor([c + n for c, n in zip(ctx, qlens)], dtype=torch.int32, device=device)
    case = dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=slot, block_tables=bt, seq_lens=seq_lens,
                query_lens=list(qlens), context_lens=list(ctx), scale=d ** -0.5)
    if gated:   # the second half of each head's [query | gate] rows, as q_proj's output is split
        case["gate"] = torch.randn(t, hq, 2 * d, device=device).to(dtype)[..., d:]
    return case
