"""Registers, shared memory and the main loop's instruction mix of qnext's Triton kernels for sm_90a, without a GPU.

    python3 scripts/offline_sass.py [grouped] [fp8small] [sorted] [gateup] [conv] [inproj] [outproj]

Each case calls the real wrappers on CPU tensors of the model's shapes; every Triton launch is compiled instead of
run (Triton's own compiler, target sm_90, the launch-time divisibility of its arguments, as the JIT specialises
them on the GPU), its cubin disassembled (nvdisasm, bundled with Triton), and the longest loop (the K loop) counted:
instructions per iteration by opcode. A proxy, not a timing: use it to compare variants before spending device
time (docs/perf-notes.md, 2026-12-05 fourth session). Triton here may be newer than the GPU machine's.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from test_triton_compile import _signature  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ROWS: list[str] = []


def _divisibility(kernel, args, kwargs) -> dict:
    """The JIT's specialisation: pointers and ints divisible by 16 carry tt.divisibility = 16."""
    names = [p.name for p in kernel.params]
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    attrs = {}
    for i, p in enumerate(kernel.params):
        v = bound.arguments[p.name]
        if p.is_constexpr:
            continue
        if isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0 and v != 1):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _main_loop(sass: str) -> tuple[int, collections.Counter]:
    """Instructions of the longest backward-branch loop, by opcode (IMAD.MOV kept apart: register moves); of the
    whole kernel where it has no loop."""
    lines = sass.splitlines()
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"@!?U?P\w+\s+BRA\s+`\((\.L_x_\d+)\)", line)
        if not m:
            continue
        start = next((j for j, t in enumerate(lines) if t.strip().startswith(m.group(1) + ":")), None)
        if start is not None and start < i and i - start > best[1] - best[0]:
            best = (start, i)
    if best == (0, 0):
        best = (0, len(lines) - 1)
    ops: collections.Counter = collections.Counter()
    for line in lines[best[0]:best[1] + 1]:
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            op = m.group(1)
            ops[op if op.startswith("IMAD.MOV") else op.split(".")[0]] += 1
    return sum(ops.values()), ops


def _compile_instead(self, *args, grid, warmup, **kwargs):
    sig, consts, options = _signature(self, args, kwargs)
    k = triton.compile(ASTSource(self, sig, consts, _divisibility(self, args, kwargs)),
                       target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    n, ops = _main_loop(sass)
    ROWS.append(f"  {self.__name__} warps {options.get('num_warps')}: {regs.group(1) if regs else '?'} registers, "
                f"{k.metadata.shared} B shared; loop {n} instructions: "
                + ", ".join(f"{o} {c}" for o, c in ops.most_common(8)))


def case(name: str, fn) -> None:
    ROWS.clear()
    fn()
    print(name)
    print("\n".join(ROWS), flush=True)


def _moe_cases(path: str, m: int) -> None:
    """fused_moe's `path` at m tokens, int4 and fp8 experts, 64 experts of the model's shape (the kernels' code does
    not depend on the expert count)."""
    from qnext.ops.quant import quantize_fp8_block, quantize_int4_group
    from qnext.ops.triton_moe import fused_moe
    e, inter, h = 64, 512, 2048
    ids = torch.stack([torch.randperm(e)[:10] for _ in range(m)])
    for fmt, quant in (("int4", lambda w: quantize_int4_group(w, 128)), ("fp8", quantize_fp8_block)):
        w13, w2 = quant(torch.randn(e, 2 * inter, h) / 16), quant(torch.randn(e, h, inter) / 16)
        case(f"{path} MoE {fmt}, {m} tokens", lambda: fused_moe(torch.randn(m, h).bfloat16(), w13, w2,
                                                                torch.rand(m, 10), ids, path=path))


def grouped() -> None:
    """The b32 grouped MoE (serve's decode step)."""
    _moe_cases("grouped", 32)


def fp8small() -> None:
    """The dense FP8 projections of a decode batch (w8a16), both operand orders."""
    from qnext.ops.quant import quantize_fp8_block
    from qnext.ops.triton_linear_fp8 import fp8_linear, small_m_tiles
    for n, k in ((12288, 2048), (2048, 4096), (1024, 2048), (2048, 512)):
        w = quantize_fp8_block(torch.randn(n, k) / 64)
        for m in (8, 32):
            for swap in (False, True):
                tiles = small_m_tiles(m, n, k, swap=swap)
                case(f"fp8 w8a16 {m} x {n} x {k} {tiles}",
                     lambda: fp8_linear(torch.randn(m, k).bfloat16(), w, path="w8a16", tiles=tiles))


def sorted_prefill() -> None:
    """The prefill MoE (sorted path) at 8K tokens."""
    _moe_cases("sorted", 8192)


def gateup() -> None:
    """The batch-1 experts' tensor-core GEMV: int4 and fp8 by gate_up rows / warps per program, fp8 also on CUDA
    cores."""
    from qnext.ops.quant import quantize_fp8_block, quantize_int4_group
    from qnext.ops.triton_moe import fused_moe
    e, inter, h = 16, 512, 2048
    ids = torch.randperm(e)[:10].view(1, 10)
    formats = {"int4": lambda w: quantize_int4_group(w, 128), "fp8": quantize_fp8_block}
    for fmt, quant in formats.items():
        w13, w2 = quant(torch.randn(e, 2 * inter, h) / 16), quant(torch.randn(e, h, inter) / 16)
        cfgs = [{}, dict(mbm1=1, mw1=1), dict(mbm1=2, mw1=2), dict(mbm1=4, mw1=4), dict(mst=1), dict(mks1=64),
                dict(mks1=32), dict(mks2=64), dict(mks2=128)]
        cfgs += [dict(mma=False)] if fmt == "fp8" else []
        for cfg in cfgs:
            case(f"{fmt} GEMV b1 {cfg or 'default'}", lambda: fused_moe(torch.randn(1, h).bfloat16(), w13, w2,
                                                                        torch.rand(1, 10), ids, path="gemv",
                                                                        config=cfg))


def conv() -> None:
    """The GDN layer's prefill conv at 8K tokens (q, k, v read by column runs out of in_proj_qkvz's output, written
    as three planes), per token-block height."""
    from qnext.config import ModelConfig
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.ops.triton_conv1d import causal_conv1d_prefill_
    from qnext.weights.presets import preset_config
    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config("qwen3-coder-next")), 0, dtype=torch.bfloat16,
                        device="meta")
    cols, t, c = gdn.qkv_columns(torch.device("cpu")), 8192, 8192
    x = torch.empty(t, gdn.in_proj_qkvz.out_features, dtype=torch.bfloat16)
    cu, slots, init = torch.tensor([0, t], dtype=torch.int32), torch.tensor([3]), torch.tensor([True])
    for bt, warps in ((32, 4), (16, 4), (64, 8)):
        case(f"conv prefill 8K, bt {bt}, {warps} warps",
             lambda: causal_conv1d_prefill_(x, torch.randn(c, 4).bfloat16(), torch.zeros(8, c, 3).bfloat16(),
                                            slots, init, cu, x_cols=cols, x_cols_run=gdn.qkv_run, bt=bt,
                                            warps=warps, split=(2048, 2048)))


def inproj() -> None:
    """The GDN layer's batch-1 in_proj pair (in_proj_qkvz 12288 x 2048 fp8 with in_proj_ba 64 x 2048 bf16), alone
    and with the decode conv in its epilogue."""
    from qnext.config import ModelConfig
    from qnext.model.layers.gdn import GatedDeltaNet
    from qnext.ops.quant import quantize_fp8_block
    from qnext.ops.triton_fused_linear import linear_pair, linear_pair_conv_update_
    from qnext.weights.presets import preset_config
    gdn = GatedDeltaNet(ModelConfig.from_hf(preset_config("qwen3-coder-next")), 0, dtype=torch.bfloat16,
                        device="meta")
    cpu = torch.device("cpu")
    x, wq = torch.randn(1, 2048).bfloat16(), quantize_fp8_block(torch.randn(12288, 2048) / 45)
    wba = torch.randn(64, 2048).bfloat16()
    case("in_proj pair", lambda: linear_pair(x, wq, wba))
    case("in_proj pair + decode conv", lambda: linear_pair_conv_update_(
        x, wq, wba, torch.randn(8192, 4).bfloat16(), torch.zeros(4, 8192, 3).bfloat16(), torch.tensor([3]),
        torch.tensor([True]), gdn.qkv_columns(cpu), gdn.qkv_channels(cpu)))


def outproj() -> None:
    """The GDN layer's batch-1 decode output: the recurrence (o gated, heads' sums of squares), then out_proj (2048 x
    4096 fp8) scaling each head's sums; and apart (recurrence, norm kernel, plain GEMV)."""
    from qnext.ops import triton_fused_linear as fused
    from qnext.ops.quant import quantize_fp8_block
    bf = lambda *shape: torch.randn(*shape).bfloat16()                               # noqa: E731
    args = (bf(1, 16, 128), bf(1, 16, 128), bf(1, 32, 128), bf(1, 32), bf(1, 32), torch.randn(32), torch.randn(32),
            torch.zeros(4, 32, 128, 128), torch.tensor([3]), None, bf(1, 16, 768)[..., 512:].unflatten(-1, (2, 128)),
            bf(128), 1e-6, quantize_fp8_block(torch.randn(2048, 4096) / 64))
    default = fused.FUSE_OUT_NORM
    fused.FUSE_OUT_NORM = True
    case("GDN decode output, norm in out_proj", lambda: fused.gdn_decode_project_(*args))
    fused.FUSE_OUT_NORM = False
    case("GDN decode output, norm apart", lambda: fused.gdn_decode_project_(*args))
    fused.FUSE_OUT_NORM = default


def main() -> None:
    from qnext.ops import pdl
    pdl.pdl_enabled = lambda: True                # compile the decode kernels as the GPU runs them
    JITFunction.run = _compile_instead
    cases = {"grouped": grouped, "fp8small": fp8small, "sorted": sorted_prefill, "gateup": gateup, "conv": conv,
             "inproj": inproj, "outproj": outproj}
    for name in sys.argv[1:] or list(cases):
        cases[name]()


if __name__ == "__main__":
    main()
