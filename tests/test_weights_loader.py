"""Streaming loader: name map, single/sharded files, fused and per-expert experts, and its error messages."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qnext.config import ModelConfig
from qnext.weights.checkpoint_writer import write_checkpoint
from qnext.weights.loader import WeightError, load_weights
from qnext.weights.name_map import COPY, DOWN, GATE, MTP, UP, checkpoint_layout, expected_parameters, map_name
from qnext.weights.presets import preset_config
from qnext.weights.synthetic import ParameterHolder

LAYER0_EXPERTS = "model.layers.0.mlp.experts"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", dtype="float32", seed=3,
                            shard_size="1GB", tokenizer=False)


@pytest.fixture
def ckpt(tiny_dir, tmp_path) -> Path:
    """A private copy of the single-file tiny checkpoint, free to corrupt."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def holder(path: Path) -> ParameterHolder:
    return ParameterHolder(ModelConfig.from_hf(path), dtype=torch.float32)


def edit(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_full_preset_shapes_match_model_facts():
    cfg = ModelConfig.from_hf(preset_config("qwen3-coder-next"))
    p = expected_parameters(cfg)
    assert p["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert p["model.layers.0.linear_attn.in_proj_ba.weight"] == (64, 2048)
    assert p["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert p["model.layers.0.linear_attn.out_proj.weight"] == (2048, 4096)
    assert p["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert p["model.layers.3.self_attn.k_proj.weight"] == (512, 2048)
    assert p["model.layers.3.mlp.experts.gate_up_proj"] == (512, 1024, 2048)
    assert p["model.layers.3.mlp.experts.down_proj"] == (512, 2048, 512)
    assert p["model.layers.47.mlp.shared_expert_gate.weight"] == (1, 2048)
    assert "model.layers.2.self_attn.q_proj.weight" not in p  # layers 3, 7, ..., 47 are attention
    total = sum(math.prod(s) for s in p.values())
    assert abs(total / 1e9 - 79.7) < 0.05
    per_expert = checkpoint_layout(cfg)
    assert per_expert["model.layers.0.mlp.experts.511.down_proj.weight"] == (2048, 512)
    assert sum(math.prod(s) for s in per_expert.values()) == total


def test_name_map():
    t = map_name(f"{LAYER0_EXPERTS}.5.gate_proj.weight")
    assert (t.kind, t.param, t.expert) == (GATE, f"{LAYER0_EXPERTS}.gate_up_proj", 5)
    t = map_name(f"{LAYER0_EXPERTS}.5.up_proj.weight")
    assert (t.kind, t.param, t.expert) == (UP, f"{LAYER0_EXPERTS}.gate_up_proj", 5)
    t = map_name(f"{LAYER0_EXPERTS}.11.down_proj.weight")
    assert (t.kind, t.param, t.expert) == (DOWN, f"{LAYER0_EXPERTS}.down_proj", 11)
    for fused in ("gate_up_proj", "down_proj"):
        assert map_name(f"{LAYER0_EXPERTS}.{fused}") == map_name(f"{LAYER0_EXPERTS}.{fused}.weight")
        assert map_name(f"{LAYER0_EXPERTS}.{fused}").param == f"{LAYER0_EXPERTS}.{fused}"
    assert map_name("mtp.layers.0.mlp.experts.3.up_proj.weight").kind == MTP
    t = map_name("model.layers.0.linear_attn.A_log")
    assert (t.kind, t.param) == (COPY, "model.layers.0.linear_attn.A_log")


def test_loads_every_tensor_into_its_slot(tiny_dir):
    m = holder(tiny_dir)
    report = load_weights(m, tiny_dir, "cpu")
    raw = load_file(tiny_dir / "model.safetensors")
    assert report.loaded == len(raw) and report.mtp == [] and report.fp8_dequantized == 0
    params = dict(m.named_parameters())
    gate_up, down = params[f"{LAYER0_EXPERTS}.gate_up_proj"], params[f"{LAYER0_EXPERTS}.down_proj"]
    I = gate_up.shape[1] // 2
    for e in (0, 5, 7):
        assert torch.equal(gate_up[e, :I], raw[f"{LAYER0_EXPERTS}.{e}.gate_proj.weight"])
        assert torch.equal(gate_up[e, I:], raw[f"{LAYER0_EXPERTS}.{e}.up_proj.weight"])
        assert torch.equal(down[e], raw[f"{LAYER0_EXPERTS}.{e}.down_proj.weight"])
    for name in ("model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.3.self_attn.q_norm.weight",
                 "model.layers.0.linear_attn.conv1d.weight", "lm_head.weight"):
        assert torch.equal(params[name], raw[name])


def test_sharded_equals_single(tiny_dir, tmp_path):
    sharded = write_checkpoint(tmp_path / "sharded", "tiny", dtype="float32", seed=3, shard_size="100KB",
                               tokenizer=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a, b = holder(tiny_dir), holder(sharded)
    load_weights(a, tiny_dir)
    load_weights(b, sharded, progress=True)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def test_fused_expert_names_and_dtype_cast(tiny_dir, tmp_path):
    ref = holder(tiny_dir)
    load_weights(ref, tiny_dir)
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(tiny_dir / "config.json", fused)
    save_file({n: p.detach().to(torch.bfloat16).contiguous() for n, p in ref.named_parameters()},
              fused / "model.safetensors")
    m = holder(fused)
    load_weights(m, fused)
    for (name, x), (_, y) in zip(ref.named_parameters(), m.named_parameters()):
        assert torch.equal(x.to(torch.bfloat16).float(), y), name


def test_missing_tensor_and_missing_expert(ckpt):
    def drop(t):
        del t["model.layers.1.linear_attn.A_log"]
        del t[f"{LAYER0_EXPERTS}.3.up_proj.weight"]
    edit(ckpt, drop)
    with pytest.raises(WeightError) as e:
        load_weights(holder(ckpt), ckpt)
    msg = str(e.value)
    assert "missing parameters (2)" in msg and "model.layers.1.linear_attn.A_log" in msg
    assert f"{LAYER0_EXPERTS}.gate_up_proj (experts 3)" in msg


def test_unexpected_tensor(ckpt):
    edit(ckpt, lambda t: t.update({"model.layers.0.linear_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(WeightError, match=r"unexpected checkpoint tensors \(1\): model.layers.0.linear_attn.bogus"):
        load_weights(holder(ckpt), ckpt)


def test_wrong_shape_names_tensor_and_both_shapes(ckpt):
    edit(ckpt, lambda t: t.update({"model.layers.0.linear_attn.out_proj.weight": torch.zeros(64, 63)}))
    with pytest.raises(WeightError, match=r"model.layers.0.linear_attn.out_proj.weight has shape \[64, 63\], "
                                          r"but model.layers.0.linear_attn.out_proj.weight expects \[64, 64\]"):
        load_weights(holder(ckpt), ckpt)


def test_wrong_expert_shape_and_index(ckpt, tmp_path):
    other = Path(shutil.copytree(ckpt, tmp_path / "other"))
    edit(ckpt, lambda t: t.update({f"{LAYER0_EXPERTS}.2.gate_proj.weight": torch.zeros(31, 64)}))
    with pytest.raises(WeightError, match=r"experts.2.gate_proj.weight has shape \[31, 64\], but "
                                          r".*gate_up_proj\[2, 0:32\] \(gate half\) expects \[32, 64\]"):
        load_weights(holder(ckpt), ckpt)
    edit(other, lambda t: t.update({f"{LAYER0_EXPERTS}.8.down_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(WeightError, match=r"expert 8.*8 expert slots"):
        load_weights(holder(other), other)


@pytest.mark.parametrize("dtype,tag", [(torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2")])
def test_unsupported_dtype(ckpt, dtype, tag):
    name = "model.layers.0.linear_attn.in_proj_ba.weight"
    edit(ckpt, lambda t: t.update({name: t[name].to(dtype)}))
    with pytest.raises(WeightError, match=rf"{name} has dtype {tag}; qnext loads F32/BF16/F16"):
        load_weights(holder(ckpt), ckpt)


def test_unsupported_quantization(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match="quant_method 'gptq' is not supported"):
        load_weights(ParameterHolder(ModelConfig.from_hf(preset_config("tiny"))), ckpt)


def test_mtp_tensors_reported_not_loaded(tmp_path):
    path = write_checkpoint(tmp_path / "mtp", "tiny", dtype="bfloat16", mtp=True, tokenizer=False)
    report = load_weights(holder(path), path)
    assert "mtp.fc.weight" in report.mtp and "mtp.layers.0.mlp.experts.7.down_proj.weight" in report.mtp
    assert all(n.startswith("mtp.") for n in report.mtp)


def test_index_errors_and_device_mismatch(tiny_dir, tmp_path):
    sharded = write_checkpoint(tmp_path / "s", "tiny", shard_size="200KB", tokenizer=False)
    (sharded / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(WeightError, match="shard model-00002-of-00004.safetensors listed in .* is missing"):
        load_weights(holder(sharded), sharded)
    with pytest.raises(WeightError, match="is on cpu but loading to cuda:0 was asked"):
        load_weights(holder(tiny_dir), tiny_dir, device="cuda:0")
    with pytest.raises(WeightError, match="no safetensors weights"):
        load_weights(holder(tiny_dir), tmp_path / "nowhere")


def test_experts_both_fused_and_per_expert_is_an_error(ckpt):
    def add_fused(t):
        t[f"{LAYER0_EXPERTS}.down_proj"] = torch.stack([t[f"{LAYER0_EXPERTS}.{e}.down_proj.weight"] for e in range(8)])
    edit(ckpt, add_fused)
    with pytest.raises(WeightError, match=f"writes {LAYER0_EXPERTS}.down_proj a second time"):
        load_weights(holder(ckpt), ckpt)
