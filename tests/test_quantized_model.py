"""Quantized resident weights (FP8 block dense, int4 / FP8 experts) on the CPU references: each quantized layer
equals its plain twin holding the dequantized weights; load-time quantization and FP8 pass-through; synthetic
quantized weights; greedy engine runs; FP8 logits close to bf16; CUDA-graph helpers that need no GPU."""

from __future__ import annotations

import pytest
import torch

from qnext.cache.model_cache import ModelCache
from qnext.config import EngineConfig, ModelConfig
from qnext.engine.cache_plan import plan_cache
from qnext.engine.cuda_graphs import bucket_sizes
from qnext.engine.forward_batch import ForwardBatch
from qnext.engine.llm_engine import LLMEngine
from qnext.model.layers.linear import Fp8Linear, Linear, QuantScheme
from qnext.model.layers.moe import Experts
from qnext.model.qwen3_next import Qwen3NextForCausalLM
from qnext.ops.quant import dequantize, select_experts
from qnext.sampling_params import SamplingParams
from qnext.weights.checkpoint_writer import write_checkpoint
from qnext.weights.loader import load_weights
from qnext.weights.presets import preset_config
from qnext.weights.synthetic import INT4_CODE_STD, fill_, fill_synthetic_

TINY = ModelConfig.from_hf(preset_config("tiny"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", dtype="bfloat16", seed=5)


# ---- layers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(256, 384), (200, 72)])
def test_fp8_linear_is_dequantized_linear(shape):
    n, k = shape
    q = Fp8Linear(k, n, dtype=torch.float32, device="cpu")
    fill_("x.weight", q.weight.data, seed=1)
    q.weight_scale_inv.data.uniform_(0.005, 0.03)
    plain = Linear(k, n, dtype=torch.float32, device="cpu")
    plain.weight.data.copy_(dequantize(q.quant_weight()))
    x = torch.randn(5, k)
    assert rel(q(x), plain(x)) < 1e-6


@pytest.mark.parametrize("quant,group", [("int4", 32), ("int4", 64), ("fp8", 128)])
def test_quantized_experts_are_dequantized_experts(quant, group):
    e, h, inter, m, k = 6, 128, 64, 9, 3
    q = Experts(e, h, inter, dtype=torch.float32, quant=quant, group_size=group)
    for name, p in q.named_parameters():
        fill_(name, p.data, seed=2)
    if quant == "int4":   # vary the group scales so a wrong group index would show
        q.gate_up_proj_scale.data.uniform_(0.002, 0.01)
        q.down_proj_scale.data.uniform_(0.002, 0.01)
    plain = Experts(e, h, inter, dtype=torch.float32)
    w13, w2 = q.quant_weights()
    plain.gate_up_proj.data.copy_(dequantize(w13))
    plain.down_proj.data.copy_(dequantize(w2))
    x = torch.randn(m, h)
    weights, ids = select_experts(torch.randn(m, e), k)
    assert rel(q(x, ids.long(), weights), plain(x, ids.long(), weights)) < 1e-6



def test_int4_experts_tile_in_place(monkeypatch):
    """Experts.tile_storage: nothing on the torch backend; with the Triton kernels behind it the same parameters
    (same storage) hold the tiled layout, the outputs stay the same, and a second call changes nothing."""
    import qnext.model.layers.moe as moe_layer
    e, h, inter, m, k = 40, 128, 64, 9, 3                # 40 experts: two chunks of the in-place copy
    q = Experts(e, h, inter, dtype=torch.float32, quant="int4", group_size=32)
    for name, p in q.named_parameters():
        fill_(name, p.data, seed=3)
    q.gate_up_proj_scale.data.uniform_(0.002, 0.01)
    x = torch.randn(m, h)
    weights, ids = select_experts(torch.randn(m, e), k)
    before, storage = q(x, ids.long(), weights), q.gate_up_proj.data_ptr()
    q.tile_storage()
    assert q.tile_rows == 0
    monkeypatch.setattr(moe_layer, "resolve_backend", lambda backend, device: "triton")
    q.tile_storage()
    tiled = q.gate_up_proj.clone()
    q.tile_storage()
    assert q.tile_rows == moe_layer.INT4_TILE_ROWS and q.gate_up_proj.data_ptr() == storage
    assert torch.equal(q.gate_up_proj, tiled)
    assert torch.equal(q(x, ids.long(), weights), before)

def test_synthetic_quantized_weights_have_the_plain_scale():
    model = fill_synthetic_(Qwen3NextForCausalLM(TINY, dtype=torch.float32, device="cpu", quantization="int4"))
    ex = model.model.layers[0].mlp.experts
    codes = torch.stack((ex.gate_up_proj & 0xF, ex.gate_up_proj >> 4))
    assert codes.min() >= 1 and codes.max() <= 15                     # q - 8 in -7..7
    assert torch.allclose(ex.gate_up_proj_scale.float(), torch.tensor(0.02 / INT4_CODE_STD), rtol=1e-2)
    w13, _ = ex.quant_weights()
    assert abs(dequantize(w13).std().item() - 0.02) < 2e-3
    proj = model.model.layers[0].linear_attn.in_proj_qkvz
    assert proj.weight.dtype == torch.float8_e4m3fn and abs(dequantize(proj.quant_weight()).std().item() - 0.02) < 2e-3
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp.experts.down_proj_scale" in names and "lm_head.weight" in names
    assert names["model.layers.0.mlp.gate.weight"].dtype == torch.float32          # router stays plain
    assert names["model.layers.0.linear_attn.in_proj_ba.weight"].dtype == torch.float32


# ---- loading --------------------------------------------------------------------------------------------------------

def _plain_twin(model: Qwen3NextForCausalLM) -> Qwen3NextForCausalLM:
    """A plain float32 model holding the dequantized weights of `model`."""
    twin = Qwen3NextForCausalLM(model.config, dtype=torch.float32, device="cpu")
    params = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        mod, leaf = name.rsplit(".", 1)
        owner = model.get_submodule(mod)
        if isinstance(owner, Fp8Linear):
            p.data.copy_(dequantize(owner.quant_weight()))
        elif isinstance(owner, Experts) and owner.quant is not None:
            w13, w2 = owner.quant_weights()
            p.data.copy_(dequantize(w13 if leaf == "gate_up_proj" else w2))
        else:
            p.data.copy_(params[name])
    return twin


def _logits(model, prompts):
    batch = ForwardBatch.for_prompts(prompts, 16)
    cache = ModelCache(model.config, num_blocks=batch.block_tables.numel(), block_size=16,
                       num_slots=len(prompts), dtype=model.dtype)
    with torch.inference_mode():
        return model.compute_logits(model(batch, cache)[batch.logits_indices])


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_load_quantizes_bf16_checkpoint(bf16_ckpt, quant):
    model = Qwen3NextForCausalLM(TINY, dtype=torch.float32, device="cpu", quantization=quant)
    report = load_weights(model, bf16_ckpt)
    assert report.quantized > 0 and report.fp8_kept == 0
    plain = Qwen3NextForCausalLM(TINY, dtype=torch.float32, device="cpu")
    load_weights(plain, bf16_ckpt)
    prompts = [[1, 5, 9, 200, 7], [3, 4]]
    ql, pl = _logits(model, prompts), _logits(plain, prompts)
    assert rel(ql, pl) < (0.1 if quant == "fp8" else 0.15)            # measured 0.064 / 0.070
    assert torch.allclose(_logits(_plain_twin(model), prompts), ql, rtol=1e-5, atol=1e-6)  # exactly the reference


def test_fp8_checkpoint_stays_fp8(tmp_path):
    cfg = {**preset_config("tiny"), "hidden_size": 128, "moe_intermediate_size": 128,
           "shared_expert_intermediate_size": 128}
    path = write_checkpoint(tmp_path / "fp8", cfg, dtype="bfloat16", fp8=True, seed=2, tokenizer=False)
    mc = ModelConfig.from_hf(path)
    model = Qwen3NextForCausalLM(mc, dtype=torch.float32, device="cpu", quantization="fp8")
    report = load_weights(model, path)
    assert report.fp8_kept > 0 and report.fp8_dequantized == 0
    from safetensors.torch import load_file
    raw = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    assert torch.equal(dict(model.named_parameters())[name].view(torch.uint8), raw[name].view(torch.uint8))
    ex = model.model.layers[0].mlp.experts
    assert torch.equal(ex.gate_up_proj[3, 128:].view(torch.uint8),
                       raw["model.layers.0.mlp.experts.3.up_proj.weight"].view(torch.uint8))
    plain = Qwen3NextForCausalLM(mc, dtype=torch.float32, device="cpu")
    load_weights(plain, path)                                            # the dequantized values
    assert torch.allclose(_logits(model, [[1, 2, 3]]), _logits(plain, [[1, 2, 3]]), rtol=1e-4, atol=1e-5)


# ---- engine ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_engine_greedy_quantized_cpu(bf16_ckpt, quant):
    ec = EngineConfig(device="cpu", quantization=quant, num_kv_blocks=32, max_num_seqs=2)
    engine = LLMEngine.from_pretrained(bf16_ckpt, ec)
    assert engine.cache.num_blocks == 32 and engine.runner.decode_forward is None     # no graphs on CPU
    prompts = [[11, 12, 13, 14, 15, 16], [40, 41, 42]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    # the same greedy ids, one token at a time, from the plain twin holding the dequantized weights
    twin = _plain_twin(engine.model)
    for i, p in enumerate(prompts):
        ids = list(p)
        for _ in range(6):
            ids.append(int(_logits(twin, [ids])[0].argmax()))
        assert outs[str(i)] == ids[len(p):]


# ---- CUDA-graph bookkeeping (no GPU needed) -------------------------------------------------------------------------

def test_bucket_sizes_and_dummy_reservation():
    assert bucket_sizes(1) == [1] and bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64] and bucket_sizes(32)[-1] == 32
    ec = EngineConfig(num_kv_blocks=10, max_num_seqs=3)
    plan = plan_cache(TINY, ec, torch.device("cpu"), torch.float32, reserve_dummy=True)
    assert (plan.num_blocks, plan.dummy_page, plan.cache_blocks) == (10, 10, 11)
    assert (plan.num_slots, plan.dummy_slot, plan.cache_slots) == (3, 3, 4)
    plain = plan_cache(TINY, ec, torch.device("cpu"), torch.float32)
    assert plain.cache_blocks == 10 and plain.dummy_page is None


def test_enforce_eager_flag():
    import argparse

    from qnext.commands.engine_args import add_engine_args, engine_config_from_args
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--enforce-eager", "--quantization", "int4"])).enforce_eager
    assert not engine_config_from_args(p.parse_args([])).enforce_eager


def test_scheme_names():
    assert QuantScheme.named("int4", TINY) == QuantScheme("fp8", "int4", 32)   # tiny: hidden 64, I 32
    assert QuantScheme.named("fp8").experts == "fp8" and QuantScheme.named(None).is_plain
