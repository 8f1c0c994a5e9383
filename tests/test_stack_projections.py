"""stack_projections: projections reading the same input run as one, with the same outputs, no second copy of the
weights, an unchanged state_dict, and a second call that changes nothing."""

from __future__ import annotations

import pytest
import torch

from qnext.config import ModelConfig
from qnext.engine.forward_batch import ForwardBatch
from qnext.model.layers.linear import STACK_ALIGN, Fp8Linear, Linear, split_stacked, stack_projections
from qnext.model.qwen3_next import Qwen3NextForCausalLM
from qnext.ops.quant import quantize_fp8_block
from qnext.weights.presets import preset_config
from qnext.weights.synthetic import fill_synthetic_


def _fp8(n: int, k: int) -> Fp8Linear:
    lin = Fp8Linear(k, n, dtype=torch.float32)
    q = quantize_fp8_block(torch.randn(n, k) / 8)
    lin.weight.data, lin.weight_scale_inv.data = q.w, q.scale_inv
    return lin


@pytest.mark.parametrize("rows", [1, 65])
def test_stacked_output_is_the_outputs_side_by_side(rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 256)
    for projs in ([Linear(256, 7, dtype=torch.float32), Linear(256, 1, dtype=torch.float32)],
                  [_fp8(128, 256), _fp8(256, 256)]):
        for p in projs:
            if isinstance(p, Linear):
                p.weight.data.normal_()
        separate = torch.cat([p(x) for p in projs], dim=-1)
        stacked = stack_projections(projs)
        assert stacked is not None and stacked.weight.shape[0] % (128 if isinstance(stacked, Fp8Linear)
                                                                   else STACK_ALIGN) == 0
        y = stacked(x)
        width = separate.shape[-1]
        assert y.shape[-1] == stacked.weight.shape[0]
        assert torch.equal(y[:, width:], torch.zeros_like(y[:, width:]))                 # padding: zero rows
        parts = split_stacked(stacked, y)
        assert [t.shape[-1] for t in parts] == [p.out_features for p in projs]
        torch.testing.assert_close(torch.cat(parts, dim=-1), separate, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(torch.cat([p(x) for p in projs], dim=-1), separate)   # originals still work
        assert projs[0].weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr()


def test_unstackable_projections_stay_apart():
    assert stack_projections([Linear(256, 8, dtype=torch.float32), Linear(128, 8, dtype=torch.float32)]) is None
    assert stack_projections([Linear(256, 8, dtype=torch.float32), _fp8(128, 256)]) is None
    assert stack_projections([_fp8(128, 256), _fp8(64, 256)]) is None        # a scale block would straddle


def test_model_stacking_keeps_logits_state_dict_and_is_done_once():
    cfg = ModelConfig.from_hf(preset_config("tiny"))
    model = fill_synthetic_(Qwen3NextForCausalLM(cfg, dtype=torch.float32, device="cpu").eval(), seed=1)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    keys = list(model.state_dict())
    with torch.inference_mode():
        before = model(ForwardBatch.for_prompts(prompts), _cache(model, cfg))
        model.stack_projections()
        moe = next(m for m in model.modules() if getattr(m, "router_and_shared_gate", None) is not None)
        assert any(getattr(m, "qkv_proj", None) is not None for m in model.modules())   # attention q, k, v
        assert any(getattr(m, "ba_proj", None) is not None for m in model.modules())    # GDN b, a regrouped
        first = moe.router_and_shared_gate.weight
        model.stack_projections()
        assert moe.router_and_shared_gate.weight is first
        after = model(ForwardBatch.for_prompts(prompts), _cache(model, cfg))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys


def _cache(model, cfg):
    from qnext.cache.model_cache import ModelCache

    return ModelCache(cfg, num_blocks=8, block_size=16, num_slots=2, dtype=torch.float32, device="cpu")
