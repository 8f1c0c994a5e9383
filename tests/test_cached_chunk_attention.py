"""cached_chunk_attention (long prefill chunks over cached context through SDPA on gathered K/V) against the torch
reference paged attention, on the CPU (SDPA materialises the bottom-right mask there; on the GPU the same call
runs the flash kernel, covered by tests/test_gpu_ops.py)."""

from __future__ import annotations

import pytest
import torch
from paged_case import paged_case

from qnext.ops import paged_attention as ref_mod
from qnext.ops.paged_attention import write_kv
from qnext.ops.triton_paged_attention import cached_chunk_attention


@pytest.mark.parametrize("ctx,n,block_size", [(37, 64, 16), (130, 200, 16), (1, 70, 64), (500, 64, 64)])
def test_cached_chunk_matches_reference(ctx, n, block_size):
    torch.manual_seed(ctx + n)
    case = paged_case([ctx], [n], block_size, hq=8, hkv=2, d=32)
    ref = ref_mod.paged_attention(**dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone()))
    write_kv(case["k"], case["v"], case["k_cache"], case["v_cache"], case["slot_mapping"])
    out = cached_chunk_attention(case["q"], case["k_cache"], case["v_cache"], case["block_tables"][0], ctx + n,
                                 case["scale"])
    assert out.shape == case["q"].shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
