"""scripts/train_demo.py's capturable pieces compute what HF's own code computes: the dense experts implementation
(same loss and gradients as HF's routed one) and the balance loss through HF's scatter_add branch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_demo  # noqa: E402
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as hf  # noqa: E402


def _model() -> Qwen3NextForCausalLM:
    cfg = Qwen3NextConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
                          num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                          full_attention_interval=2, output_router_logits=True, router_aux_loss_coef=0.01,
                          max_position_embeddings=256)
    torch.manual_seed(0)
    return Qwen3NextForCausalLM(cfg)


def test_dense_experts_match_hf_routed_experts():
    train_demo.register_dense_experts()
    model, x = _model(), torch.randint(0, 300, (2, 40))
    results = {}
    for impl in ("eager", "dense"):
        model.set_experts_implementation(impl)
        model.zero_grad()
        out = model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        results[impl] = out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert results["dense"][0] == pytest.approx(results["eager"][0], rel=1e-6)
    torch.testing.assert_close(results["dense"][1], results["eager"][1], rtol=1e-4, atol=1e-7)


def test_capturable_balance_loss_keeps_the_value(monkeypatch):
    monkeypatch.setattr(hf, "load_balancing_loss_func", hf.load_balancing_loss_func)   # restored after the test
    logits = tuple(torch.randn(10, 8) for _ in range(3))
    expected = hf.load_balancing_loss_func(logits, 8, 2)
    train_demo.capturable_balance_loss()
    assert float(hf.load_balancing_loss_func(logits, 8, 2)) == pytest.approx(float(expected), rel=1e-6)


def test_unlikelihood_candidates_are_the_tokens_of_repeated_body_lines():
    import unlikelihood_demo
    pieces = ["        self", "._w = ", "None\n",           # 0-2   first occurrence: never a candidate
              "        y", " = 2\n",                        # 3-4   too short to count
              "        self", "._w = ", "None\n",           # 5-7   repeat
              "        y", " = 2\n",                        # 8-9   short repeat: not counted
              "        self", "._w = None\n",               # 10-11 repeat, tokenized differently
              "    def", " g(self):\n",                     # 12-13 the body ended here (indent 4)
              "        self", "._w = None\n"]               # 14-15 after the end: never a candidate
    cands, ended, repeats = unlikelihood_demo.repeated_line_tokens(pieces, 4)
    assert (cands, ended, repeats) == ([5, 6, 7, 10, 11], True, True)
    assert unlikelihood_demo.repeated_line_tokens(pieces, 4, first_only=True)[0] == [5, 10]
    cands, ended, repeats = unlikelihood_demo.repeated_line_tokens(pieces[:5], 4)
    assert (cands, ended, repeats) == ([], False, False)
