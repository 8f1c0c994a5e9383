"""Synthetic checkpoints: presets, tokenizer, writer output, `qnext synth`, the default model, random weights,
and qnext's own chat template (rendered with jinja2 directly)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from qnext.config import ModelConfig
from qnext.weights.checkpoint_writer import CHAT_TEMPLATE, _quantized, parse_size, plan_shards, write_checkpoint
from qnext.weights.loader import load_weights
from qnext.weights.name_map import checkpoint_layout
from qnext.weights.presets import PRESETS, TOKENIZER_SIZES, preset_config
from qnext.weights.synth_tokenizer import build_tokenizer, special_token_ids
from qnext.weights.synthetic import ParameterHolder, fill_synthetic_


# ---- presets and tokenizer ----------------------------------------------------------------------------------------
def test_full_preset_is_qwen3_coder_next():
    cfg = ModelConfig.from_hf(preset_config("qwen3-coder-next"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (2048, 48, 151936)
    assert cfg.attention_layer_ids == tuple(range(3, 48, 4))
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim) == (16, 2, 256, 64)
    assert cfg.rope_theta == 5e6 and cfg.max_position_embeddings == 262144 and not cfg.tie_word_embeddings
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.conv_dim) == (16, 32, 8192)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (512, 10, 512)
    assert cfg.shared_expert_intermediate_size == 512 and cfg.norm_topk_prob and cfg.rms_norm_eps == 1e-6
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151643, (151645,))
    ids = special_token_ids(TOKENIZER_SIZES["qwen3-coder-next"])  # Qwen's own ids
    assert (ids["<|im_start|>"], ids["<tool_call>"], ids["</tool_call>"], ids["<|fim_prefix|>"]) == (
        151644, 151657, 151658, 151659)
    assert (ids["<tool_response>"], ids["<think>"], ids["</think>"]) == (151665, 151667, 151668)
    for name in PRESETS:
        c = ModelConfig.from_hf(preset_config(name))
        assert TOKENIZER_SIZES[name] <= c.vocab_size
        assert c.bos_token_id == special_token_ids(TOKENIZER_SIZES[name])["<|endoftext|>"]


def test_tokenizer_specials_and_determinism():
    tok = build_tokenizer(512)
    assert tok.get_vocab_size(with_added_tokens=True) == 512
    ids = special_token_ids(512)
    assert ids["<|endoftext|>"] == 486 and ids["</think>"] == 511
    for content, i in ids.items():
        assert tok.token_to_id(content) == i
    text = "<|im_start|>user\ndef f(x):\n    return {'a': 1}<|im_end|>\n<tool_call>\n<function=run>"
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert enc.ids[0] == ids["<|im_start|>"] and ids["<tool_call>"] in enc.ids
    kept = tok.decode(enc.ids, skip_special_tokens=True)  # tool tags are not special, as in Qwen's tokenizer
    assert "<tool_call>" in kept and "<|im_start|>" not in kept
    assert build_tokenizer(512).to_str() == tok.to_str()
    with pytest.raises(ValueError, match="tokenizer size must be >="):
        build_tokenizer(100)


# ---- writer -------------------------------------------------------------------------------------------------------
def test_written_directory_is_consistent_and_loads(tmp_path):
    path = write_checkpoint(tmp_path / "tiny", "tiny", dtype="bfloat16", seed=1)
    names = {p.name for p in path.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "generation_config.json"}
    cfg_json = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    assert cfg_json["bos_token_id"] == gen["bos_token_id"] == eot and cfg_json["eos_token_id"] == im_end
    assert gen["eos_token_id"] == [im_end, eot] and gen["pad_token_id"] == eot
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["pad_token"] == "<|endoftext|>"
    assert tok_cfg["added_tokens_decoder"][str(im_end)]["special"] is True
    assert tok_cfg["added_tokens_decoder"][str(tok.token_to_id("<tool_call>"))]["special"] is False
    assert tok.get_vocab_size() <= cfg_json["vocab_size"] and cfg_json["torch_dtype"] == "bfloat16"
    assert (path / "chat_template.jinja").read_text() == CHAT_TEMPLATE.read_text()
    cfg = ModelConfig.from_hf(path)
    assert load_weights(ParameterHolder(cfg), path).loaded == len(checkpoint_layout(cfg))
    with pytest.raises(FileExistsError):
        write_checkpoint(path, "tiny")


def test_full_preset_streams_in_bounded_shards():
    """The 80B is planned as ~4 GB shards whose headers are known before any tensor exists."""
    layout = checkpoint_layout(ModelConfig.from_hf(preset_config("qwen3-coder-next")))
    plan = plan_shards(layout, set(), torch.bfloat16, parse_size("4GB"))
    assert len(plan) == 40 and max(s.nbytes for s in plan) <= 4 * 10**9
    assert plan[0].file == "model-00001-of-00040.safetensors"
    assert abs(sum(s.nbytes for s in plan) - 2 * 79.674e9) < 0.01e9
    quant = {n for n, s in layout.items() if _quantized(n, s)}
    fp8_plan = plan_shards(layout, quant, torch.bfloat16, parse_size("4GB"))
    assert 80e9 < sum(s.nbytes for s in fp8_plan) < 81e9  # ~ Qwen3-Next-80B-FP8's size
    entries = {name: (dt, shape) for s in fp8_plan for name, dt, shape in s.entries}
    assert entries["model.layers.0.mlp.experts.9.gate_proj.weight_scale_inv"] == (torch.float32, (4, 16))
    assert entries["model.layers.0.linear_attn.in_proj_ba.weight"] == (torch.bfloat16, (64, 2048))
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1GiB") == 2**30 and parse_size(7) == 7


def test_cli_synth(tmp_path, capsys):
    from qnext.cli import main

    out = tmp_path / "ckpt"
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--fp8", "--seed", "2", "--dtype", "float16"]) == 0
    cfg = ModelConfig.from_hf(out)
    assert cfg.quantization["quant_method"] == "fp8" and cfg.torch_dtype == "float16"
    assert main(["synth", "--preset", "tiny", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_synth_config_only_serves_synthetic_weights(tmp_path, capsys):
    """`qnext synth --config-only` writes a directory without weights that `--synthetic` runs (and the server) use
    for their config and tokenizer; serving one without a tokenizer is refused with a message."""
    import httpx
    from server_fixture import MODEL_NAME, ServerProcess

    from qnext.cli import main

    out = tmp_path / "shape"
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--config-only"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"]
    with ServerProcess(out, "--synthetic", "--max-model-len", "256") as server:
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((out / "config.json").read_text())
    assert main(["serve", "--model", str(tmp_path / "bare"), "--synthetic", "--device", "cpu"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_default_model_created_once(tmp_path, monkeypatch):
    import qnext.default_model as dm

    monkeypatch.setenv("QNEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "PRESET", "tiny")  # same code path, smaller files
    monkeypatch.setattr(dm, "DEMO_DIR", tmp_path / "no-demo")
    path = dm.default_model_path()
    assert path == tmp_path / "cache" / "default-synthetic" and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert dm.default_model_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["default-synthetic"]  # no temporary left behind
    monkeypatch.setattr(dm, "VERSION", dm.VERSION + 1)  # outdated cache is rebuilt in place
    assert dm.default_model_path() == path and (path / "model.safetensors").stat().st_mtime_ns != stamp
    assert [p.name for p in path.parent.iterdir()] == ["default-synthetic"]
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "config.json").write_text("{}")
    monkeypatch.setattr(dm, "DEMO_DIR", demo)
    assert dm.default_model_path() == demo


# ---- synthetic weights on the device ------------------------------------------------------------------------------
def test_synthetic_fill_is_sensible_and_seeded():
    cfg = ModelConfig.from_hf(preset_config("tiny"))
    a = dict(fill_synthetic_(ParameterHolder(cfg), seed=0).named_parameters())
    b = dict(fill_synthetic_(ParameterHolder(cfg), seed=0).named_parameters())
    c = dict(fill_synthetic_(ParameterHolder(cfg), seed=1).named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    dt = torch.nn.functional.softplus(a["model.layers.0.linear_attn.dt_bias"])
    assert dt.min() >= 1e-3 * 0.99 and dt.max() <= 0.1 * 1.01
    a_log = a["model.layers.0.linear_attn.A_log"]
    assert a_log.min() >= 0 and a_log.max() <= math.log(16) + 1e-6
    assert (a["model.layers.0.linear_attn.norm.weight"] - 1).abs().max() < 0.2
    assert a["model.layers.0.input_layernorm.weight"].abs().max() < 0.2  # zero-centred
    assert a["model.layers.3.self_attn.q_norm.weight"].abs().max() < 0.2
    w = a["model.layers.0.mlp.experts.gate_up_proj"]
    assert abs(w.std().item() - 0.02) < 0.002 and all(torch.isfinite(p).all() for p in a.values())


@torch.inference_mode()
def test_synthetic_model_gives_finite_varied_logits():
    from qnext.cache.model_cache import ModelCache
    from qnext.engine.forward_batch import ForwardBatch
    from qnext.model import Qwen3NextForCausalLM

    cfg = ModelConfig.from_hf(preset_config("tiny"))
    model = fill_synthetic_(Qwen3NextForCausalLM(cfg, dtype=torch.float32, device="cpu"), seed=0)
    batch = ForwardBatch.for_prompts([list(range(5, 45))], block_size=16)
    cache = ModelCache(cfg, num_blocks=4, block_size=16, num_slots=1, dtype=torch.float32)
    logits = model.compute_logits(model(batch, cache))
    assert torch.isfinite(logits).all() and logits.std() > 1e-3
    assert len(set(logits.argmax(-1).tolist())) > 1


# ---- chat template ------------------------------------------------------------------------------------------------
def render(messages, tools=None, add_generation_prompt=False) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)  # HF's: no HTML escaping
    return env.from_string(CHAT_TEMPLATE.read_text()).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file.\n",
    "parameters": {"type": "object", "required": ["path"], "properties": {
        "path": {"type": "string", "description": "Path to read"},
        "lines": {"type": "array", "items": {"type": "integer"}},
        "mode": {"type": "string", "enum": ["text", "bytes"], "default": "text"}}}}},
    {"name": "noop", "parameters": {"type": "object", "properties": {}}}]


def test_template_plain_turns_and_content_parts():
    out = render([{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
                  {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "Bye"}], add_generation_prompt=True)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                   "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n"


def test_template_lists_tools_in_system_turn():
    out = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "go"}], tools=TOOLS,
                 add_generation_prompt=True)
    system = out.split("<|im_end|>\n")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    tools = system[system.index("<tools>"): system.index("</tools>") + len("</tools>")]
    assert tools == (
        "<tools>\n<function>\n<name>read_file</name>\n<description>Read a file.</description>\n<parameters>\n"
        "<parameter>\n<name>path</name>\n<type>string</type>\n<description>Path to read</description>\n</parameter>\n"
        "<parameter>\n<name>lines</name>\n<type>array</type>\n<items>{\"type\": \"integer\"}</items>\n</parameter>\n"
        "<parameter>\n<name>mode</name>\n<type>string</type>\n<enum>[\"text\", \"bytes\"]</enum>\n"
        "<default>text</default>\n</parameter>\n<required>[\"path\"]</required>\n</parameters>\n</function>\n"
        "<function>\n<name>noop</name>\n<parameters>\n</parameters>\n</function>\n</tools>")
    after = system[system.index("</tools>"):]
    assert "<tool_call>\n<function=" in after and "</parameter>\n</function>\n</tool_call>" in after
    assert out.endswith("<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n")
    no_system = render([{"role": "user", "content": "go"}], tools=TOOLS)
    assert no_system.startswith("<|im_start|>system\n# Tools\n\n")


def test_template_tool_calls_and_responses():
    msgs = [{"role": "user", "content": "look"},
            {"role": "assistant", "content": "Reading both.", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "read_file", "arguments": {
                    "path": "a.py", "lines": [1, 2], "opts": {"x": "<b>"}, "force": True, "limit": 3,
                    "note": None}}},
                {"id": "2", "type": "function", "function": {"name": "read_file", "arguments": {"path": "b.py"}}}]},
            {"role": "tool", "tool_call_id": "1", "content": "print('a')"},
            {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "print('b')"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"function": {"name": "noop", "arguments": {}}}]},
            {"role": "tool", "content": "ok"}]
    out = render(msgs, tools=TOOLS, add_generation_prompt=True)
    turns = out.split("<|im_end|>\n")
    assert turns[2] == (
        "<|im_start|>assistant\nReading both.\n<tool_call>\n<function=read_file>\n"
        "<parameter=path>\na.py\n</parameter>\n<parameter=lines>\n[1, 2]\n</parameter>\n"
        "<parameter=opts>\n{\"x\": \"<b>\"}\n</parameter>\n<parameter=force>\ntrue\n</parameter>\n"
        "<parameter=limit>\n3\n</parameter>\n<parameter=note>\nnull\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=read_file>\n<parameter=path>\nb.py\n</parameter>\n</function>\n</tool_call>")
    assert turns[3] == ("<|im_start|>user\n<tool_response>\nprint('a')\n</tool_response>\n"
                        "<tool_response>\nprint('b')\n</tool_response>\n")
    assert turns[4] == "<|im_start|>assistant\n<tool_call>\n<function=noop>\n</function>\n</tool_call>"
    assert turns[5] == "<|im_start|>user\n<tool_response>\nok\n</tool_response>\n"
    assert turns[6] == "<|im_start|>assistant\n"


def test_template_renders_identically_under_transformers():
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    compile_ = getattr(utils, "_compile_jinja_template", None)
    if compile_ is None:
        pytest.skip("transformers has no _compile_jinja_template")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "read_file", "arguments": {"path": "x", "lines": [1]}}}]},
        {"role": "tool", "content": "data"}]
    hf = compile_(CHAT_TEMPLATE.read_text()).render(messages=msgs, tools=TOOLS, add_generation_prompt=True)
    assert hf == render(msgs, tools=TOOLS, add_generation_prompt=True)
