"""The engine on CUDA (skipped without a GPU; run on the device machine): work a layer runs on its side stream
(the shared expert, GDN's in_proj_ba) gives bit-identical results to one stream, eagerly and in decode CUDA graphs
(the engine uses it in the graphs only).
The model is the "narrow" preset: the 80B's head shapes (the Triton kernels compile for its constants), hidden 256."""

from __future__ import annotations

import random

import pytest
import torch

from qnext.cache.model_cache import ModelCache
from qnext.config import EngineConfig, ModelConfig
from qnext.engine.forward_batch import ForwardBatch
from qnext.engine.llm_engine import LLMEngine
from qnext.model.qwen3_next import Qwen3NextForCausalLM
from qnext.sampling_params import SamplingParams
from qnext.weights.presets import preset_config
from qnext.weights.synthetic import fill_synthetic_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")



@pytest.fixture(scope="module", params=[None, "int4"])
def narrow(request):
    cfg = ModelConfig.from_hf(preset_config("narrow"))
    model = Qwen3NextForCausalLM(cfg, dtype=torch.bfloat16, device="cuda", quantization=request.param).eval()
    fill_synthetic_(model, seed=2)
    model.stack_projections()
    return model, cfg


def test_side_stream_forward_is_bit_identical(narrow):
    model, cfg = narrow
    prompts = [[random.Random(i).randrange(cfg.vocab_size) for _ in range(n)] for i, n in enumerate((5, 70, 33))]
    side = torch.cuda.Stream()
    outs = []
    for stream in (None, side, None):
        batch = ForwardBatch.for_prompts(prompts, 16, "cuda", max_len=80)
        batch.side_stream = stream
        cache = ModelCache(cfg, num_blocks=batch.block_tables.numel(), block_size=16, num_slots=3,
                           dtype=torch.bfloat16, device="cuda")
        with torch.inference_mode():
            prefill = model(batch, cache)
            step = batch.next_decode([1, 2, 3])
            step.side_stream = stream
            decode = model(step, cache)
        outs.append((prefill.clone(), decode.clone(), cache.ssm[0].clone()))
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    for a, b in zip(outs[0], outs[2]):
        assert torch.equal(a, b)


def test_side_stream_engine_greedy_ids_unchanged(narrow):
    """Decode graphs captured with side-stream branches (the default) against one stream."""
    model, cfg = narrow
    prompts = [[random.Random(10 + i).randrange(cfg.vocab_size) for _ in range(n)] for i, n in enumerate((9, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(no_side_stream: bool) -> list[list[int]]:
        engine = LLMEngine(model, cfg, EngineConfig(device="cuda", num_kv_blocks=64, max_num_seqs=4,
                                                    no_side_stream=no_side_stream))
        assert (engine.runner.decode_forward.side_stream is None) == no_side_stream
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        return [done[str(i)] for i in range(len(prompts))]

    assert run(False) == run(True)
