"""Our Triton kernels on the CPU, through Triton's interpreter (tests/triton_interpret_check.py in a subprocess):
the glue kernels (norms, routing, activation, conv with its column map), the fp8 GEMV (also with SwiGLU formed in
its prologue, two GEMVs in one launch, and with the GDN decode conv in its epilogue), the fused MoE paths (GEMV,
grouped and sorted; 16-bit, int4 and fp8 weights), paged attention (decode with splits, prefill over cached
context) and the fused GDN decode step against their torch references, and the tiny model's greedy tokens through
the whole Triton backend against the torch backend. Skipped where Triton is not installed; the GPU runs of
tests/test_gpu_ops.py check the same kernels compiled."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture(scope="module")
def results():
    script = Path(__file__).with_name("triton_interpret_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(script.parent.parent))
    proc = subprocess.run([sys.executable, str(script), "--model"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_glue_kernels_match_reference(results):
    for name, value in results.items():
        if name.startswith(("moe_route_ids", "moe_group_pairs", "rmsnorm_moe_combine_bits", "norm_rows_bits",
                            "linear_pair_conv_bits")):
            assert value is True, name
        elif isinstance(value, float):
            exact = "float32" in name or name.startswith(("conv", "fp8", "paged", "gdn"))  # float32 on both sides
            assert value < (1e-6 if exact else 2e-2), (name, value)
    # (gemv, sorted, grouped at 3 and 70 tokens) x 4 formats (int4 in rows and in tiles) x (summed or not)
    assert sum(name.startswith("fused_moe_") for name in results) == 32
    assert results["moe_group_pairs_ids"] is True
    assert {"moe_gemv_mma1/fp8", "moe_gemv_cores1/fp8"} <= results.keys()
    assert sum(name.startswith("norm_rows_bits/") for name in results) == 2
    assert sum(name.startswith(("silu_mul_linear/", "linear_pair/")) for name in results) == 4
    assert sum(name.startswith(("linear_pair_conv/", "linear_pair_conv_bits/")) for name in results) == 4
    # the GDN output norm finished in out_proj: only where the norm's output is rounded differs from the kernels apart
    assert sum(name.startswith("out_proj_norm") for name in results) == 4
    assert max(v for name, v in results.items() if name.startswith("out_proj_norm_apart/")) < 2e-3
    assert sum(name.startswith(("silu_mul_linear_route/", "moe_route_ids/fused_")) for name in results) == 4


def test_greedy_argmax_is_torch_argmax(results):
    assert results["greedy_argmax_equal"] is True


def test_attention_norm_pair_is_the_two_norms(results):
    assert results["rope_pair_bits"] is True


def test_model_greedy_tokens_same_through_triton_backend(results):
    assert results["model_greedy_equal"], results["tokens"]
