"""HF model -> our writer (Qwen's per-expert on-disk naming, sharded) -> our loader -> our model: logits equal HF's."""

from __future__ import annotations

import pytest
import torch
from conftest import build_hf_model, tiny_config
from safetensors import safe_open

from qnext.cache.model_cache import ModelCache
from qnext.config import ModelConfig
from qnext.engine.forward_batch import ForwardBatch
from qnext.model import Qwen3NextForCausalLM
from qnext.weights.checkpoint_writer import write_checkpoint
from qnext.weights.loader import load_weights

BLOCK = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def written_names(path) -> set[str]:
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    return names


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}], ids=["untied", "tied"])
@torch.inference_mode()
def test_written_hf_weights_load_to_hf_logits(tmp_path, overrides):
    d = tiny_config(**overrides)
    hf = build_hf_model(d, seed=11)
    path = write_checkpoint(tmp_path / "ckpt", d, dtype="float32", weights=hf.state_dict(), shard_size="200KB",
                            tokenizer=False)
    names = written_names(path)
    assert (path / "model.safetensors.index.json").is_file()
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    assert ("lm_head.weight" in names) != bool(overrides.get("tie_word_embeddings"))

    ours = Qwen3NextForCausalLM(ModelConfig.from_hf(path), dtype=torch.float32, device="cpu")
    load_weights(ours, path, "cpu")
    theirs = hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, theirs[name]), name

    tokens = torch.randint(3, 301, (57,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = ForwardBatch.for_prompts([tokens], block_size=BLOCK)
    cache = ModelCache(ours.config, num_blocks=8, block_size=BLOCK, num_slots=2, dtype=ours.dtype)
    logits = ours.compute_logits(ours(batch, cache))
    ref = hf(torch.tensor([tokens])).logits[0].float()
    assert rel(logits, ref) < 1e-4


@torch.inference_mode()
def test_transformers_reads_our_synthetic_checkpoint(tmp_path):
    """Our `qnext synth` output is a real checkpoint: transformers loads the weights (MTP skipped) and tokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    from transformers import Qwen3NextForCausalLM as HFModel

    path = write_checkpoint(tmp_path / "synth", "tiny", dtype="float32", shard_size="300KB", mtp=True, seed=5)
    hf = HFModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = Qwen3NextForCausalLM(ModelConfig.from_hf(path), dtype=torch.float32, device="cpu")
    assert load_weights(ours, path).mtp
    theirs = hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, theirs[name]), name
    text = "def f(x):\n    return x  # <tool_call>"
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert hf_tok(text)["input_ids"] == Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
    assert hf_tok.eos_token_id == ours.config.eos_token_id[0]
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
