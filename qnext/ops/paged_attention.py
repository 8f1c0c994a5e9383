"""Attention over the paged KV cache, torch reference.

The cache of one layer is K, V [num_blocks, block_size, Hkv, D] (the model dtype, or float8_e4m3fn: K/V
clamped to its range, widened back to q's dtype when read); token p of sequence i lives in page
block_tables[i, p // block_size] at offset p % block_size. New K/V are first written at slot_mapping
(flat slot = page * block_size + offset). Sequence i's q_len_i queries are its last q_len_i tokens: query j sits at
position seq_len_i - q_len_i + j and sees keys 0..that position (causal, bottom-right aligned). GQA: query head h
reads kv head h // (Hq / Hkv). With `gate` (Qwen3-Next's gated attention) the output is attn * sigmoid(gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qnext.ops.registry import register

Tensor = torch.Tensor


FP8_KV_MAX = 448.0    # float8_e4m3fn's largest finite value: an fp8 cache stores K/V clamped to it, no scale


def to_cache_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x converted for a cache of `dtype` (float8_e4m3fn: clamped to +-FP8_KV_MAX first, never NaN)."""
    if dtype == torch.float8_e4m3fn:
        x = x.float().clamp(-FP8_KV_MAX, FP8_KV_MAX)
    return x.to(dtype)


def _indexable(t: Tensor) -> Tensor:
    """t itself, or its bytes for an fp8 tensor (torch's CPU index_copy_ and gathers do not take float8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v [T, Hkv, D] -> k_cache, v_cache [num_blocks, block_size, Hkv, D] at flat slots [T] (in place), in the
    cache's dtype (to_cache_dtype)."""
    for new, cache in ((k, k_cache), (v, v_cache)):
        rows = _indexable(cache).view(-1, *cache.shape[2:])
        rows.index_copy_(0, slot_mapping, _indexable(to_cache_dtype(new, cache.dtype)))


def gather_pages(cache: Tensor, pages: Tensor, length: int) -> Tensor:
    """cache [NB, BS, H, D], pages [..., P] -> the first `length` tokens [..., length, H, D]."""
    g = _indexable(cache)[pages].view(cache.dtype)                # [..., P, BS, H, D]
    return g.flatten(-4, -3)[..., :length, :, :]


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    """q [B, Lq, Hq, D], k/v [B, L, Hkv, D], mask broadcastable to [B, Hq, Lq, L] (True = visible)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
        scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@register("paged_attention", "torch")
def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, *,
                    slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_lens: list[int], context_lens: list[int], scale: float,
                    gate: Tensor | None = None) -> Tensor:
    """q [T, Hq, D]; k, v [T, Hkv, D]; slot_mapping [T] int64; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (device); query_lens, context_lens [B] host ints; gate [T, Hq, D] or None
    -> out [T, Hq, D] in q.dtype (times sigmoid(gate) when given)."""
    out = _paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_lens,
                           context_lens, scale)
    return out if gate is None else out * torch.sigmoid(gate)


def _paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_lens, context_lens,
                     scale) -> Tensor:
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    bs = k_cache.shape[1]
    lens = [c + n for c, n in zip(context_lens, query_lens)]
    if lens and all(n == 1 for n in query_lens):
        # batched decode: every sequence's keys padded to the longest, masked past seq_len
        longest = max(lens)
        pages = block_tables[:, :(longest + bs - 1) // bs].long()
        keys, values = (gather_pages(c, pages, longest).to(q.dtype) for c in (k_cache, v_cache))  # [B, L, Hkv, D]
        visible = torch.arange(longest, device=q.device)[None, :] < seq_lens[:, None]        # [B, L]
        hidden = ~visible[:, :, None, None]  # stale non-finite entries would survive the mask as NaN
        keys, values = keys.masked_fill(hidden, 0), values.masked_fill(hidden, 0)
        return _attend(q[:, None], keys, values, visible[:, None, None, :], scale)[:, 0]
    out = torch.empty_like(q)
    start = 0
    for i, (n, length) in enumerate(zip(query_lens, lens)):   # prefill chunks: one sequence at a time
        pages = block_tables[i, :(length + bs - 1) // bs].long()
        keys = gather_pages(k_cache, pages, length).to(q.dtype)[None]
        values = gather_pages(v_cache, pages, length).to(q.dtype)[None]
        context = length - n
        mask = None
        if context > 0 and n > 1:
            qpos = torch.arange(context, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= qpos[:, None]          # [n, L]
        out[start:start + n] = _attend(q[None, start:start + n], keys, values, mask, scale,
                                       causal=context == 0 and n > 1)[0]
        start += n
    return out
