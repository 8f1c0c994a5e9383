"""The offline API (qnext.LLM) on tiny checkpoints written here, with and without a tokenizer."""

import pytest

from qnext import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from qnext.weights.checkpoint_writer import write_checkpoint
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", dtype="float32")
    return LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=256, block_size=4)


def test_generate_text_and_token_prompts(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(["def fib(n):", {"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    assert len(outs) == 2
    tok = llm.get_tokenizer()
    a, b = outs[0].outputs[0], outs[1].outputs[0]
    assert outs[0].prompt == "def fib(n):" and outs[0].prompt_token_ids == tok.encode("def fib(n):")
    assert len(a.token_ids) == 8 and a.finish_reason == "length"
    assert a.text == tok.decode(a.token_ids)
    assert outs[1].prompt_token_ids == [1, 2, 3] and len(b.token_ids) == 8
    # same prompt again (alone, other ids) gives the same greedy tokens; input order is kept
    again = llm.generate([{"prompt_token_ids": [1, 2, 3]}, "def fib(n):"], params, use_tqdm=False)
    assert again[0].outputs[0].token_ids == b.token_ids and again[1].outputs[0].token_ids == a.token_ids


def test_n_and_seeds(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    one = SamplingParams(temperature=1.0, max_tokens=6, seed=12, ignore_eos=True)  # completion 1 = seed + 1
    assert llm.generate([[5, 6, 7, 8]], one, use_tqdm=False)[0].outputs[0].token_ids == out.outputs[1].token_ids
    # many prompts beyond the engine's queue capacity still all come back, in order
    many = [{"prompt_token_ids": [i + 1, i + 2]} for i in range(40)]
    outs = llm.generate(many, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [m["prompt_token_ids"] for m in many]


def test_chat(llm):
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 5
    text = llm.engine.chat_template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out[0].prompt == text and text.endswith("assistant\n")
    two = llm.chat([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]], params,
                   use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    # default params come from the checkpoint's generation_config.json
    assert llm.engine.default_sampling_params().top_k == 40


def test_bad_requests(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [1] * 10}, SamplingParams(max_tokens=10**6), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_checkpoint_without_tokenizer(tmp_path):
    from qnext.weights.checkpoint_writer import write_checkpoint
    path = write_checkpoint(tmp_path / "notok", "tiny", dtype="float32", tokenizer=False)
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=32)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=3),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="chat"):
        llm.chat([{"role": "user", "content": "hi"}])
