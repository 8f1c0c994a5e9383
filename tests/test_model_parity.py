"""Our Qwen3NextForCausalLM against transformers' on a tiny random config (float32 unless stated)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_hf_model, tiny_config
from qnext.cache.model_cache import ModelCache
from qnext.config import ModelConfig
from qnext.engine.forward_batch import ForwardBatch
from qnext.model import Qwen3NextForCausalLM
from qnext.model.state import kv_bytes_per_token, state_bytes_per_slot

BLOCK = 16
TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ours_from(hf, config_dict, dtype=torch.float32) -> Qwen3NextForCausalLM:
    model = Qwen3NextForCausalLM(ModelConfig.from_hf(config_dict), dtype=dtype, device="cpu")
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


def new_cache(model, num_blocks=96, num_slots=8) -> ModelCache:
    return ModelCache(model.config, num_blocks=num_blocks, block_size=BLOCK, num_slots=num_slots,
                      dtype=model.dtype)


@torch.inference_mode()
def hf_logits(hf, tokens: list[int]) -> torch.Tensor:  # [L, V]
    return hf(torch.tensor([tokens])).logits[0].float()


def prompts(lengths, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 301, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ours(hf_model, hf_config_dict):
    return ours_from(hf_model, hf_config_dict)


def test_parameter_names_and_shapes_match_hf(ours, hf_model):
    theirs = hf_model.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    assert list(ours.buffers()) == []
    experts = ours.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (8, 2 * 32, 64) and experts.down_proj.shape == (8, 64, 32)
    assert hasattr(ours.model.layers[1].mlp, "gate_proj")  # mlp_only_layers -> dense


@torch.inference_mode()
def test_single_prompt_logits(ours, hf_model):
    (p,) = prompts([130])
    batch = ForwardBatch.for_prompts([p], block_size=BLOCK)
    logits = ours.compute_logits(ours(batch, new_cache(ours)))
    assert logits.dtype == torch.float32 and logits.shape == (130, 301)
    assert rel(logits, hf_logits(hf_model, p)) < TOL


@torch.inference_mode()
def test_mixed_length_batch(ours, hf_model):
    ps = prompts([70, 1, 150, 33, 64, 5], seed=1)
    batch = ForwardBatch.for_prompts(ps, block_size=BLOCK)
    hidden = ours(batch, new_cache(ours))
    logits = ours.compute_logits(hidden)
    for i, p in enumerate(ps):
        s, e = batch.cu_query_lens[i].item(), batch.cu_query_lens[i + 1].item()
        assert rel(logits[s:e], hf_logits(hf_model, p)) < TOL, f"prompt {i} (len {len(p)})"
    last = ours.compute_logits(hidden[batch.logits_indices])
    torch.testing.assert_close(last, logits[batch.logits_indices], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_chunked_prefill_with_decode_mates(ours, hf_model):
    """Prompt A arrives in chunks of 50, 64, 1 and 33 tokens over four steps while prompt B, prefilled earlier,
    decodes one token in each of the same steps. Every chunk's logits equal HF's full-prompt logits there."""
    a, b = prompts([148, 20], seed=2)
    cache = new_cache(ours)
    tables, slots = [list(range(0, 10)), list(range(10, 20))], [3, 5]   # 160 tokens each
    first = ForwardBatch.build([b], [0], [tables[1]], [slots[1]], BLOCK)
    b_tokens = b + [int(ours.compute_logits(ours(first, cache))[-1].argmax())]
    ref_a, done = hf_logits(hf_model, a), 0
    for n in (50, 64, 1, 33):
        step = ForwardBatch.build([a[done:done + n], b_tokens[-1:]], [done, len(b_tokens) - 1], tables, slots,
                                  BLOCK)
        assert not step.is_decode or n == 1
        logits = ours.compute_logits(ours(step, cache))
        assert rel(logits[:n], ref_a[done:done + n]) < TOL, f"chunk at {done}"
        assert rel(logits[n:], hf_logits(hf_model, b_tokens)[-1:]) < TOL
        b_tokens.append(int(logits[-1].argmax()))
        done += n
    assert done == len(a)


@torch.inference_mode()
def test_greedy_generation_matches_hf(ours, hf_model):
    ps, new = prompts([70, 9, 101], seed=3), 32
    batch = ForwardBatch.for_prompts(ps, block_size=BLOCK, max_len=101 + new)
    cache = new_cache(ours)
    generated: list[list[int]] = [[] for _ in ps]
    step_logits: list[list[torch.Tensor]] = [[] for _ in ps]
    for _ in range(new):
        hidden = ours(batch, cache)
        logits = ours.compute_logits(hidden[batch.logits_indices])
        nxt = logits.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            generated[i].append(t)
            step_logits[i].append(logits[i])
        batch = batch.next_decode(nxt)
        assert batch.is_decode
    eos, hf_model.generation_config.eos_token_id = hf_model.generation_config.eos_token_id, None
    try:  # without eos: the random model may emit it at any time
        outs = [hf_model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)[0, len(p):].tolist()
                for p in ps]
    finally:
        hf_model.generation_config.eos_token_id = eos
    for i, (p, out) in enumerate(zip(ps, outs)):
        assert generated[i] == out, f"prompt {i}"
        # decode numerics, not just argmax: HF teacher-forced logits at the same positions
        ref = hf_logits(hf_model, p + generated[i][:-1])[len(p) - 1:]
        assert rel(torch.stack(step_logits[i]), ref) < TOL


@torch.inference_mode()
def test_one_token_prompt_then_decode(ours, hf_model):
    (p,) = prompts([1], seed=4)
    batch = ForwardBatch.for_prompts([p], block_size=BLOCK, max_len=6)  # q_len 1 with no context: decode path
    assert batch.is_decode
    cache, tokens = new_cache(ours), list(p)
    for _ in range(5):
        logits = ours.compute_logits(ours(batch, cache))
        assert rel(logits[-1], hf_logits(hf_model, tokens)[-1]) < TOL
        tokens.append(int(logits[-1].argmax()))
        batch = batch.next_decode([tokens[-1]])


@torch.inference_mode()
def test_tied_embeddings_yarn_and_sparse_step():
    d = tiny_config(tie_word_embeddings=True, decoder_sparse_step=2, mlp_only_layers=[],
                    max_position_embeddings=2048,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                     "factor": 4.0, "original_max_position_embeddings": 512},
                    partial_rotary_factor=0.5)
    hf = build_hf_model(d, seed=5)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours = ours_from(hf, d)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.config.rope_scaling["rope_type"] == "yarn"
    (p,) = prompts([90], seed=5)
    logits = ours.compute_logits(ours(ForwardBatch.for_prompts([p], block_size=BLOCK), new_cache(ours)))
    assert rel(logits, hf_logits(hf, p)) < TOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.3},
])
def test_rotary_scaling_matches_hf(rope):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    from qnext.model.layers.rotary import RotaryEmbedding

    params = {"rope_theta": 5e6, "partial_rotary_factor": 0.25, **rope}
    d = tiny_config(rope_parameters=params, max_position_embeddings=1024, head_dim=64)
    hf_cfg = Qwen3NextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "torch_dtype")})
    positions = torch.tensor([0, 1, 7, 100, 513, 1023])
    cos_ref, sin_ref = Qwen3NextRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = RotaryEmbedding(ModelConfig.from_hf(d))(positions)
    half = cos.shape[-1]
    assert cos.shape == (6, 8)
    torch.testing.assert_close(cos, cos_ref[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, sin_ref[0, :, :half], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_bfloat16_no_worse_than_hf_bfloat16(hf_model, hf_config_dict):
    """bf16 drifts on this random model (MoE routing flips), so the bar is HF's own bf16 error vs float32."""
    ours16 = ours_from(hf_model, hf_config_dict, dtype=torch.bfloat16)
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    assert ours16.model.layers[0].linear_attn.A_log.dtype == torch.float32
    ps = prompts([40, 3], seed=6)
    batch = ForwardBatch.for_prompts(ps, block_size=BLOCK, max_len=45)
    cache = new_cache(ours16)
    assert cache.ssm[0].dtype == torch.float32 and cache.kv[2][0].dtype == torch.bfloat16
    logits = ours16.compute_logits(ours16(batch, cache))
    assert logits.dtype == torch.float32
    ref = hf_logits(hf_model, ps[0])
    assert rel(logits[:40], ref) < 1.5 * rel(hf_logits(hf16, ps[0]), ref)
    step = ours16.compute_logits(ours16(batch.next_decode([5, 6]), cache))
    ref = hf_logits(hf_model, ps[0] + [5])[-1]
    assert rel(step[0], ref) < 1.5 * rel(hf_logits(hf16, ps[0] + [5])[-1], ref) + 0.02


def test_meta_construction(hf_config_dict):
    model = Qwen3NextForCausalLM(ModelConfig.from_hf(hf_config_dict), dtype=torch.bfloat16, device="meta")
    params = dict(model.named_parameters())
    assert all(p.is_meta and not p.requires_grad for p in params.values())
    assert params["model.layers.0.linear_attn.in_proj_qkvz.weight"].shape == (2 * 2 * 16 + 2 * 4 * 24, 64)
    assert params["model.layers.0.linear_attn.conv1d.weight"].shape == (2 * 2 * 16 + 4 * 24, 1, 4)
    assert params["model.layers.2.self_attn.q_proj.weight"].shape == (2 * 4 * 32, 64)
    tied = Qwen3NextForCausalLM(ModelConfig.from_hf(tiny_config(tie_word_embeddings=True)), device="meta")
    assert "lm_head.weight" not in dict(tied.named_parameters())
    tied.to_empty(device="cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_state_bytes_of_the_real_model():
    d = tiny_config(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, full_attention_interval=4,
                    num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                    num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, mlp_only_layers=[])
    cfg = ModelConfig.from_hf(d)
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 24 * 1024
    assert state_bytes_per_slot(cfg, "bfloat16") == 36 * (3 * 8192 * 2 + 32 * 128 * 128 * 4)
    assert state_bytes_per_slot(cfg, torch.bfloat16, ssm_dtype=torch.bfloat16) == 36 * (3 * 8192 + 32 * 128 * 128) * 2
