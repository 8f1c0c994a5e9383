"""Shared fixtures: a tiny Qwen3-Next config and a random HF reference model built from it (float32)."""

from __future__ import annotations

import math
import os

import pytest
import torch

# One intra-op thread unless asked: on a shared 2-core box, oversubscribed OpenMP threads stalled these tests 100x.
torch.set_num_threads(int(os.environ.get("QNEXT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test draws the same random inputs whatever runs before it, so a statistical bound cannot flake."""
    torch.manual_seed(0)


def tiny_config(**overrides) -> dict:
    """6 layers: GDN, GDN, attention, GDN, GDN, attention; layer 1 has a dense MLP, the others are MoE."""
    cfg = dict(
        model_type="qwen3_next",
        vocab_size=301,
        hidden_size=64,
        num_hidden_layers=6,
        full_attention_interval=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        partial_rotary_factor=0.25,
        max_position_embeddings=1024,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        intermediate_size=80,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter with O(1)-activation random values (HF inits norms, A_log, dt_bias to constants).

    Decays are kept mild (exp(A_log) in [0.02, 0.5]) so GDN state really carries across chunk boundaries.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(p):
        return torch.randn(p.shape, generator=gen, dtype=torch.float32)

    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            value = torch.empty(p.shape).uniform_(math.log(0.02), math.log(0.5), generator=gen)
        elif name.endswith("dt_bias"):
            value = 0.5 * randn(p)
        elif name.endswith("linear_attn.norm.weight"):
            value = 1.0 + 0.2 * randn(p)
        elif p.dim() == 1:  # zero-centred RMSNorm weights
            value = 0.2 * randn(p)
        elif name.endswith("embed_tokens.weight"):
            value = randn(p)
        else:  # projections [..., out, in] and conv1d [C, 1, K]: unit-variance outputs
            value = randn(p) / math.sqrt(p.shape[-1])
        p.copy_(value.to(p.dtype))


@pytest.fixture(scope="session")
def hf_config_dict() -> dict:
    return tiny_config()


def build_hf_model(config_dict: dict, seed: int = 0):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM as HFModel

    d = {k: v for k, v in config_dict.items() if k not in ("model_type", "torch_dtype")}
    hf_cfg = Qwen3NextConfig(**d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = HFModel(hf_cfg).float().eval()
    randomize(model, seed)
    return model


@pytest.fixture(scope="session")
def hf_model(hf_config_dict):
    """Random HF Qwen3NextForCausalLM (float32, every parameter perturbed), the numerical oracle."""
    return build_hf_model(hf_config_dict)
