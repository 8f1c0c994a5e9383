"""Named model shapes for synthetic checkpoints and benchmarks, as config.json dicts (HF field names).

- tiny: seconds on CPU; the shape tests build.
- small: the default synthetic model (a few tens of millions of parameters); still quick on CPU.
- narrow: the 80B's head shapes (attention, GDN) at hidden 256, 4 layers, 16 experts: the GPU parity model (its
  Triton kernels compile for the same head constants as the 80B's; scripts/gpu_e2e.py, tests/test_gpu_engine.py).
- qwen3-coder-next: exactly the 80B Qwen3-Coder-Next shape (model-facts.md), rope_theta 5e6.
bos/eos ids here are those of the preset's synthetic tokenizer (Qwen's special tokens appended last).
"""

from __future__ import annotations

import copy

from qnext.weights.synth_tokenizer import special_token_ids

_COMMON = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}


def _preset(tokenizer_size: int, **fields) -> dict:
    ids = special_token_ids(tokenizer_size)
    return {**_COMMON, **fields, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}


PRESETS: dict[str, dict] = {
    "tiny": _preset(
        512, vocab_size=512, hidden_size=64, num_hidden_layers=4, full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5_000_000.0,
        max_position_embeddings=4096,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        intermediate_size=128,
    ),
    "small": _preset(
        4096, vocab_size=4096, hidden_size=256, num_hidden_layers=8, full_attention_interval=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, rope_theta=5_000_000.0,
        max_position_embeddings=32768,
        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=128,
        intermediate_size=512,
    ),
    "narrow": _preset(
        1024, vocab_size=1024, hidden_size=256, num_hidden_layers=4, full_attention_interval=2,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, rope_theta=5_000_000.0,
        max_position_embeddings=4096,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=128,
        intermediate_size=512,
    ),
    # The 80B shape; its tokenizer has Qwen's 151669 entries so the special ids equal Qwen's (151643...).
    "qwen3-coder-next": _preset(
        151669, vocab_size=151936, hidden_size=2048, num_hidden_layers=48, full_attention_interval=4,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, rope_theta=5_000_000.0,
        max_position_embeddings=262144,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        intermediate_size=5120,
    ),
}

# Entries of each preset's synthetic tokenizer (<= vocab_size; the model's extra rows are never produced by it).
TOKENIZER_SIZES = {"tiny": 512, "small": 4096, "narrow": 1024, "qwen3-coder-next": 151669}


def preset_config(name: str) -> dict:
    """A fresh copy of a preset's config.json dict; ValueError names the known presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
