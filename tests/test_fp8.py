"""Block FP8 (e4m3, 128x128 scales): quantize/dequantize, and FP8 checkpoints that load to the dequantized values."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qnext.config import ModelConfig
from qnext.weights import fp8
from qnext.weights.checkpoint_writer import write_checkpoint
from qnext.weights.loader import WeightError, load_weights
from qnext.weights.name_map import GATE, UP, map_name
from qnext.weights.presets import preset_config
from qnext.weights.synthetic import ParameterHolder

# Every projection dimension straddles 128-blocks: 144 = 128 + 16, 136, 448 = 3.5 blocks, 288, 200.
ODD = {**preset_config("tiny"), "hidden_size": 144, "num_attention_heads": 2, "num_key_value_heads": 1,
       "head_dim": 72, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 40,
       "linear_value_head_dim": 36, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 136,
       "shared_expert_intermediate_size": 200}


def reference_dequant(q: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """One block at a time, straight from the definition W[r, c] = Q[r, c] * S[r // b0, c // b1]."""
    out = torch.empty(q.shape, dtype=torch.float32)
    R, C = q.shape
    for i in range(math.ceil(R / block[0])):
        for j in range(math.ceil(C / block[1])):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = q[rs, cs].float() * s[i, j].float()
    return out


@pytest.mark.parametrize("shape", [(300, 260), (3, 136, 144), (1, 5), (128, 128), (129, 257)])
def test_quantize_round_trip(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3.0
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.dtype == torch.float32
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    d = fp8.dequantize(q, s, (128, 128), torch.float32)
    s_full = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    assert torch.all((d - w).abs() <= w.abs() / 16 + s_full * 2**-9 + 1e-12)  # 3 mantissa bits, subnormals
    assert torch.all(q.float().abs().amax() <= fp8.FP8_MAX)
    if len(shape) == 2:
        assert torch.equal(d, reference_dequant(q, s))


def test_zero_block_and_dtype():
    w = torch.zeros(130, 10)
    w[129, 3] = 5.0
    q, s = fp8.quantize(w)
    assert torch.isfinite(s).all() and s[1, 0] > 0
    d = fp8.dequantize(q, s, (128, 128), torch.bfloat16)
    assert d.dtype == torch.bfloat16 and d[:128].abs().sum() == 0 and d[129, 3] == 5.0


@pytest.fixture(scope="module")
def odd_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    q = write_checkpoint(root / "fp8", ODD, dtype="bfloat16", fp8=True, seed=7, tokenizer=False)
    plain = write_checkpoint(root / "bf16", ODD, dtype="bfloat16", fp8=False, seed=7, tokenizer=False)
    return q, plain


def test_fp8_checkpoint_layout(odd_ckpts):
    path, _ = odd_ckpts
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["weight_block_size"] == [128, 128]
    assert "model.layers.0.linear_attn.in_proj_ba" in qc["modules_to_not_convert"]
    assert "model.layers.0.mlp.gate" in qc["modules_to_not_convert"] and "lm_head" in qc["modules_to_not_convert"]
    raw = load_file(path / "model.safetensors")
    assert raw["model.layers.0.linear_attn.in_proj_qkvz.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.linear_attn.in_proj_qkvz.weight_scale_inv"].shape == (4, 2)
    assert raw["model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv"].shape == (2, 2)
    assert raw["model.layers.0.linear_attn.in_proj_ba.weight"].dtype == torch.bfloat16
    assert raw["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert ModelConfig.from_hf(path).quantization["weight_block_size"] == [128, 128]


def test_fp8_checkpoint_loads_to_dequantized_reference(odd_ckpts):
    path, plain = odd_ckpts
    cfg = ModelConfig.from_hf(path)
    m = ParameterHolder(cfg, dtype=torch.float32)
    report = load_weights(m, path)
    params = dict(m.named_parameters())
    raw = load_file(path / "model.safetensors")
    scales = [n for n in raw if n.endswith("weight_scale_inv")]
    assert report.fp8_dequantized == len(scales) > 0
    for sname in scales:
        name = sname.replace("weight_scale_inv", "weight")
        t = map_name(name)
        dst = params[t.param]
        if t.kind in (GATE, UP):
            half = dst.shape[1] // 2
            dst = dst[t.expert, :half] if t.kind == GATE else dst[t.expert, half:]
        elif t.expert is not None:
            dst = dst[t.expert]
        assert torch.equal(dst, reference_dequant(raw[name], raw[sname])), name
    # ... and close to the same seed written in bf16 (FP8 error only)
    ref = ParameterHolder(ModelConfig.from_hf(plain), dtype=torch.float32)
    load_weights(ref, plain)
    for name, p in ref.named_parameters():
        rel = (params[name] - p).norm() / p.norm()
        assert rel < 0.05, (name, rel)


def test_weight_scale_name_variant(odd_ckpts, tmp_path):
    path, _ = odd_ckpts
    a = ParameterHolder(ModelConfig.from_hf(path))
    load_weights(a, path)
    other = Path(shutil.copytree(path, tmp_path / "variant"))
    raw = load_file(other / "model.safetensors")
    save_file({n.replace("weight_scale_inv", "weight_scale"): t for n, t in raw.items()},
              other / "model.safetensors")
    b = ParameterHolder(ModelConfig.from_hf(other))
    assert load_weights(b, other).fp8_dequantized > 0
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def _corrupt(path: Path, tmp_path: Path, fn) -> Path:
    other = Path(shutil.copytree(path, tmp_path / "bad"))
    raw = load_file(other / "model.safetensors")
    fn(raw)
    save_file(raw, other / "model.safetensors")
    return other


def test_fp8_errors(odd_ckpts, tmp_path):
    path, _ = odd_ckpts
    cfg = ModelConfig.from_hf(path)
    w = "model.layers.0.linear_attn.out_proj.weight"
    bad = _corrupt(path, tmp_path, lambda t: t.pop(w + "_scale_inv"))
    with pytest.raises(WeightError, match=f"FP8 tensor {w} has no scale tensor"):
        load_weights(ParameterHolder(cfg), bad)
    shutil.rmtree(bad)
    bad = _corrupt(path, tmp_path, lambda t: t.update({w + "_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(WeightError, match=r"scale of FP8 tensor .* has shape \[1, 1\], expected \[2, 2\]"):
        load_weights(ParameterHolder(cfg), bad)
    shutil.rmtree(bad)
    ba = "model.layers.0.linear_attn.in_proj_ba.weight"
    bad = _corrupt(path, tmp_path, lambda t: t.update({ba + "_scale_inv": torch.ones(1, 2)}))
    with pytest.raises(WeightError, match=f"{ba} has a scale tensor .* but is stored as BF16"):
        load_weights(ParameterHolder(cfg), bad)


@pytest.mark.parametrize("qcfg,msg", [
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "'static'"),
    ({"quant_method": "fp8"}, "per-tensor FP8 is not supported"),
    ({"quant_method": "awq"}, "quant_method 'awq'"),
])
def test_unsupported_quantization_configs(qcfg, msg):
    with pytest.raises(WeightError, match=msg):
        fp8.Fp8Format.from_config(qcfg)


def test_modules_to_not_convert_matching():
    f = fp8.Fp8Format.from_config({"quant_method": "fp8", "weight_block_size": [128, 128],
                                   "modules_to_not_convert": ["lm_head", "model.layers.0.linear_attn.in_proj_ba",
                                                              "shared_expert_gate", "model.layers.1"]})
    assert f.block == (128, 128)
    assert not f.converts("lm_head") and not f.converts("model.layers.0.linear_attn.in_proj_ba")
    assert f.converts("model.layers.2.linear_attn.in_proj_ba") and f.converts("model.layers.0.linear_attn.in_proj_qkvz")
    assert not f.converts("model.layers.5.mlp.shared_expert_gate")
    assert f.converts("model.layers.5.mlp.shared_expert.up_proj")
    assert not f.converts("model.layers.1.mlp.gate") and f.converts("model.layers.11.mlp.gate")
