"""The decode step's Triton kernels compile for Hopper (sm_90) with programmatic dependent launch, without a GPU.

Why: Triton's CPU interpreter (tests/test_triton_interpreter.py) checks what the kernels compute, not that they
compile: it runs them as Python, so a compile-time error such as a loop-carried variable changing type passes it
and first shows on the GPU machine, whose time is scarce. Here every launch of the real wrappers (called on
CPU tensors) is intercepted and compiled to PTX for sm_90 by Triton's own compiler, as the H100 / H200 would;
nothing runs. Each kernel launched with PDL must contain the grid-dependency wait.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}
# every kernel that a decode step launches with PDL (qnext/ops/pdl.py)
PDL_KERNELS = {"_norm_kernel", "_route_kernel", "_silu_mul_kernel", "_gate_add_kernel", "_fp8_gemv_kernel",
               "_fp8_dot_kernel", "_moe_gemv_gate_up_kernel", "_moe_gemv_down_kernel",
               "_moe_mma_gate_up_kernel", "_moe_mma_down_kernel", "_group_pairs_kernel",
               "_moe_grouped_kernel", "_conv_update_kernel", "_paged_decode_kernel", "_paged_merge_kernel",
               "_kv_write_kernel", "_gdn_recurrent_kernel", "_swiglu_gemv_route_kernel",
               "_rope_kernel", "_slice_max_kernel", "_pick_kernel", "_rope_norm_pair_kernel",
               "_gemv_pair_conv_kernel"}


def _signature(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """(Triton signature, constexprs, compile options) of one launch, from its real arguments."""
    params = [p.name for p in kernel.params]
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in params}
    sig, consts = {}, {}
    for i, p in enumerate(kernel.params):
        v = bound.arguments[p.name]
        if p.is_constexpr:
            sig[p.name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, consts, options


@pytest.fixture()
def compiled(monkeypatch):
    """Launches under this fixture compile for sm_90 instead of running: {kernel name: [ptx, ...]}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from qnext.ops import pdl

    out: dict[str, list[str]] = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        sig, consts, options = _signature(self, args, kwargs)
        k = triton.compile(ASTSource(self, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
        out.setdefault(self.__name__, []).append(k.asm["ptx"])

    monkeypatch.setattr(JITFunction, "run", compile_instead)
    monkeypatch.setattr(pdl, "pdl_enabled", lambda: True)
    return out


def _bf(*shape):
    return torch.randn(*shape).bfloat16()


def test_decode_kernels_compile_for_hopper_with_pdl(compiled, monkeypatch):
    from qnext.ops import triton_conv1d, triton_ffn, triton_norm, triton_paged_attention
    from qnext.ops.fla_gdn import gdn_decode_
    from qnext.ops.quant import quantize_fp8_block, quantize_int4_group
    from qnext.ops.triton_linear_fp8 import fp8_gemv, fp8_linear, linear
    from qnext.ops.triton_moe import fused_moe

    h = 256                                        # the shapes set constexprs only; full size is not needed
    triton_norm.rmsnorm(_bf(1, h), _bf(h), 1e-6, _bf(1, h))
    from qnext.ops.norm import MoeCombine
    triton_norm.rmsnorm(MoeCombine(_bf(1, 10, h), _bf(1, 1), _bf(1, h)), _bf(h), 1e-6, _bf(1, h))
    triton_norm.gated_rmsnorm(_bf(1, 4, 128), _bf(1, 4, 128), _bf(128), 1e-6)
    triton_norm.rmsnorm_rope(_bf(1, 4, 256), _bf(256), 1e-6, torch.randn(1, 32), torch.randn(1, 32))
    triton_norm.rmsnorm_rope_pair(_bf(1, 4, 256), _bf(256), _bf(1, 2, 256), _bf(256), 1e-6, torch.randn(1, 32),
                                  torch.randn(1, 32))
    triton_ffn.moe_route(_bf(1, 512), 10, True)
    triton_norm.rope_cos_sin(torch.tensor([7]), torch.rand(32), 1.0)
    from qnext.ops.triton_sampling import greedy_argmax
    greedy_argmax(_bf(1, 151936))
    triton_ffn.silu_mul(_bf(1, 512), _bf(1, 512))
    triton_ffn.sigmoid_gate_add(_bf(1, 10, h), _bf(1, 1), _bf(1, h))
    w8 = quantize_fp8_block(torch.randn(512, 1024) / 32)
    fp8_gemv(_bf(1, 1024), w8)                               # one step per program
    fp8_gemv(_bf(1, 1024), w8, bn=16, ng=2)                  # several steps (the loop-carried tiles)
    linear(_bf(1, 1024), _bf(64, 1024))                      # bf16_gemv
    from qnext.ops.triton_fused_linear import silu_mul_linear_route
    gu = _bf(1, 2048)                                        # shared down (I = 1024 here) beside the routing
    silu_mul_linear_route(gu[:, :1024], gu[:, 1024:], w8, None, _bf(1, 512), 10, True)
    from qnext.ops.triton_fused_linear import linear_pair_conv_update_      # in_proj pair + the GDN decode conv
    chans = torch.cat((torch.arange(384, dtype=torch.int32), torch.full((128,), -1, dtype=torch.int32)))
    linear_pair_conv_update_(_bf(1, 1024), w8, _bf(64, 1024), _bf(384, 4), torch.zeros(4, 384, 3).bfloat16(),
                             torch.tensor([3]), None, torch.arange(384, dtype=torch.int32), chans)
    fp8_linear(_bf(32, 1024), w8)                            # w8a16 tiles of a 32-row decode batch, split K
    from qnext.ops.triton_linear_fp8 import small_m_tiles
    fp8_linear(_bf(32, 1024), w8, path="w8a16", tiles=small_m_tiles(32, 512, 1024, swap=True))   # weights first
    e, inter = 16, 128
    w13 = quantize_int4_group(torch.randn(e, 2 * inter, h) / 16, 128)
    w2 = quantize_int4_group(torch.randn(e, h, inter) / 16, 128)
    for m, path in ((1, "gemv"), (8, "gemv"), (32, "grouped")):
        ids = torch.stack([torch.randperm(e)[:10] for _ in range(m)])
        fused_moe(_bf(m, h), w13, w2, torch.rand(m, 10), ids, path=path)
        if path == "gemv":                                   # the CUDA-core int4 GEMV kernels
            fused_moe(_bf(m, h), w13, w2, torch.rand(m, 10), ids, path=path, config={"mma": False})
    w13, w2 = quantize_fp8_block(torch.randn(e, 2 * inter, h) / 16), quantize_fp8_block(torch.randn(e, h, inter) / 16)
    fused_moe(_bf(1, h), w13, w2, torch.rand(1, 10), ids[:1], path="gemv")    # fp8 experts at b1 on tensor cores
    c, slots = 384, torch.tensor([3])
    triton_conv1d.causal_conv1d_update_(_bf(1, c), _bf(c, 1, 4), torch.zeros(4, c, 3).bfloat16(), slots, None)
    blocks = torch.arange(8, dtype=torch.int32).view(1, 8)
    triton_paged_attention.paged_decode_attention(_bf(1, 16, 256), _bf(8, 16, 2, 256), _bf(8, 16, 2, 256), blocks,
                                                  torch.tensor([100], dtype=torch.int32), 0.0625, max_seq_len=128,
                                                  num_splits=4, gate=_bf(1, 16, 512)[..., 256:])
    triton_paged_attention.write_kv(_bf(1, 2, 256), _bf(1, 2, 256), _bf(8, 16, 2, 256), _bf(8, 16, 2, 256),
                                    torch.tensor([17]))
    f8 = [torch.zeros(8, 16, 2, 256, dtype=torch.float8_e4m3fn) for _ in range(2)]       # kv_cache_dtype fp8
    triton_paged_attention.paged_decode_attention(_bf(1, 16, 256), *f8, blocks, torch.tensor([100], dtype=torch.int32),
                                                  0.0625, max_seq_len=128, num_splits=4)
    triton_paged_attention.write_kv(_bf(1, 2, 256), _bf(1, 2, 256), *f8, torch.tensor([17]))
    for state in (torch.float32, torch.bfloat16):                                          # ssm_state_dtype
        gdn_decode_(_bf(1, 2, 128), _bf(1, 2, 128), _bf(1, 4, 128), _bf(1, 4), _bf(1, 4), torch.randn(4),
                    torch.randn(4), torch.zeros(4, 4, 128, 128, dtype=state), slots, None)
    from qnext.ops import triton_fused_linear                               # recurrence, norm finished in out_proj
    monkeypatch.setattr(triton_fused_linear, "FUSE_OUT_NORM", True)
    for wo in (quantize_fp8_block(torch.randn(256, 512) / 32), _bf(256, 512)):
        triton_fused_linear.gdn_decode_project_(_bf(1, 2, 128), _bf(1, 2, 128), _bf(1, 4, 128), _bf(1, 4), _bf(1, 4),
                                                torch.randn(4), torch.randn(4), torch.zeros(4, 4, 128, 128), slots,
                                                None, _bf(1, 2, 5, 128)[:, :, 3:], _bf(128), 1e-6, wo)

    assert PDL_KERNELS <= set(compiled), f"not launched: {sorted(PDL_KERNELS - set(compiled))}"
    for name in PDL_KERNELS:
        for ptx in compiled[name]:
            assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sorted_int4_pair_dequant_compiles_for_hopper(compiled, dtype):
    """The prefill MoE's swapped int4 tiles with dq_pairs (int4_dq's two-byte inline PTX): the PTX assembles for
    sm_90 and holds the two-byte dequant (the default); with dq_pairs off the four-byte one. Its values are a GPU test
    (tests/test_gpu_ops.py: test_int4_dequant_asm_matches_arith, test_fused_moe_sorted_dq_pairs)."""
    from qnext.ops.quant import quantize_int4_group
    from qnext.ops.triton_moe import fused_moe
    m, e, h, inter = 64, 8, 256, 128
    w13 = quantize_int4_group(torch.randn(e, 2 * inter, h) / 16, 128)
    w2 = quantize_int4_group(torch.randn(e, h, inter) / 16, 128)
    ids = torch.stack([torch.randperm(e)[:4] for _ in range(m)])
    x = torch.randn(m, h).to(dtype)
    fused_moe(x, w13, w2, torch.rand(m, 4), ids, path="sorted", config={"dq_pairs": True})
    paired = compiled.pop("_moe_dot_kernel")
    fused_moe(x, w13, w2, torch.rand(m, 4), ids, path="sorted", config={"dq_pairs": False})
    plain = compiled.pop("_moe_dot_kernel")
    assert len(paired) == len(plain) == 2                     # gate_up and down
    assert all("0x4140" in ptx for ptx in paired) and not any("0x4140" in ptx for ptx in plain)   # its prmt


def test_conv_prefill_compiles_for_hopper(compiled):
    """The prefill conv's kernels (all tokens as one stateless sequence, then each sequence's first K-1 tokens with
    its state, then the new states) compile for sm_90 in each column mode. Values: test_triton_interpreter.py."""
    from qnext.ops.triton_conv1d import causal_conv1d_prefill_
    c, t = 256, 100
    cu, slots, init = torch.tensor([0, 40, t], dtype=torch.int32), torch.tensor([1, 3]), torch.tensor([True, False])
    cols = torch.arange(c, dtype=torch.int32) + 64
    for kw in ({}, dict(x_cols=cols), dict(x_cols=cols, x_cols_run=128)):
        causal_conv1d_prefill_(_bf(t, c + 64), _bf(c, 4), torch.zeros(4, c, 3).bfloat16(), slots, init, cu, **kw)
    assert all(len(compiled[k]) == 3 for k in ("_conv_prefill_kernel", "_conv_head_kernel", "_conv_state_kernel"))
