"""qnext eval: perplexity equals a direct computation, completion scoring rules, the held-out split, and the
bundled demo model loading through the normal loader."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from qnext.eval import complete as C
from qnext.eval import heldout as H
from qnext.eval.ppl import load_documents, perplexity

DOCS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "        self.y = y\n\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n" * 2,
    "import os\nprint(os.getcwd())\n",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from qnext.weights.checkpoint_writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", dtype="float32", seed=3)


def _direct_ppl(path: Path, docs: list[str], window: int) -> tuple[float, int]:
    """The same windows, scored by HF transformers' Qwen3-Next on whole windows (no cache, no chunks)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    nll, n = 0.0, 0
    for doc in docs:
        ids = [eot] + tok.encode(doc).ids
        for start in range(0, len(ids) - 1, window - 1):
            win = torch.tensor([ids[start:start + window]])
            with torch.no_grad():
                logits = model(input_ids=win).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, win[0, 1:], reduction="sum").item()
            n += win.shape[1] - 1
    return nll, n


def test_ppl_equals_direct_computation(tiny_checkpoint):
    from qnext.config import EngineConfig
    from qnext.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_pretrained(tiny_checkpoint, EngineConfig(device="cpu", dtype="float32", max_num_seqs=1))
    window = 37  # several windows per document; chunks of 16 continue through the KV cache and GDN state
    r = perplexity(engine, DOCS, window=window, chunk=16)
    nll, n = _direct_ppl(tiny_checkpoint, DOCS, window)
    tok = engine.tokenizer
    assert r.tokens == n == sum(len(tok.encode(d)) for d in DOCS)  # every document token scored once
    assert r.documents == len(DOCS)
    assert r.nll == pytest.approx(nll, rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r.tokens_per_s > 0
    capped = perplexity(engine, DOCS, window=window, chunk=16, max_tokens=20)
    assert capped.tokens == 20 and capped.documents == 1


def test_load_documents(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.txt").write_text("ignored\n")
    (tmp_path / "corpus.txt").write_text("one\n<|endoftext|>\ntwo\n<|endoftext|>\n\n")
    assert load_documents([tmp_path / "pkg", tmp_path / "corpus.txt"]) == ["x = 1\n", "one", "two"]
    with pytest.raises(FileNotFoundError):
        load_documents([tmp_path / "missing"])


# ---- completion scoring -----------------------------------------------------------------------------------------
def test_cut_body():
    assert C.cut_body("    return 1\n\ndef g():\n", 0) == ("    return 1\n\n", True)
    assert C.cut_body("        x = 1\n    def g(self):\n", 4) == ("        x = 1\n", True)
    assert C.cut_body("        x = 1\n            y = 2\n", 4) == ("        x = 1\n            y = 2\n", False)
    assert C.cut_body("    a = f(\n        1,\n    )\nz", 0) == ("    a = f(\n        1,\n    )\n", True)
    assert C.cut_body("    a = 1\n  \n", 0) == ("    a = 1\n  \n", False)  # blank lines never end a body


def test_body_parses():
    assert C.body_parses("def f(x):\n", "    return x\n", 0)
    assert C.body_parses("    def f(self):\n        '''Doc.'''\n", "        return 1\n", 4)
    assert not C.body_parses("def f(x):\n", "    return (x\n", 0)
    assert not C.body_parses("def f(x):\n    '''Doc.'''\n", "    # only a comment\n\n", 0)  # no code
    assert not C.body_parses("def f(x):\n", "", 0)


def test_body_end_stop_forces_end_token():
    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    stop = C.BodyEndStop(Tok(), indent=0, end_id=2)
    logits = torch.zeros(200)
    assert torch.equal(stop([ord(c) for c in "    x = 1\n"], logits), logits)
    forced = stop([ord(c) for c in "    x = 1\nd"], logits)
    assert forced.argmax().item() == 2 and torch.isinf(forced).sum().item() == 199


def test_complete_scores_strict_and_lenient():
    from qnext.sampling_params import CompletionOutput, RequestOutput

    records = [{"file": "f.py", "line": i, "name": "f", "indent": 0, "header": "def f(x):\n", "context": "",
                "reference": "    return x\n"} for i in range(4)]
    texts = [("    return x\n\ndef g", "stop"),         # ended, parses
             ("    return (x\n\nclass", "stop"),        # ended, does not parse
             ("    y = 1\n    y = 1\n    y =", "length"),  # cut by max_tokens; its whole lines parse
             ("    return x\n", "stop")]               # end-of-sequence token: ended, parses

    class FakeLLM:
        def get_tokenizer(self):
            class T:
                def token_to_id(self, t):
                    return 7
            return T()

        def generate(self, prompts, params, use_tqdm=False):
            assert len(prompts) == len(params) == 4 and all(p.temperature == 0.0 for p in params)
            return [RequestOutput(str(i), [1], [CompletionOutput(0, t, [5] * 3, None, None, r)], True, None)
                    for i, (t, r) in enumerate(texts)]

    r = C.complete(FakeLLM(), records, context_chars=100)
    assert (r.examples, r.parsed, r.ended, r.parsed_lenient) == (4, 2, 3, 3)
    assert r.parse_rate == 0.5 and r.generated_tokens == 12
    assert [row["parsed"] for row in r.rows] == [True, False, False, True]


def test_build_prompt():
    rec = {"header": "    def m(self):\n        '''Doc.'''\n", "indent": 4,
           "context": "import os\n\n\nclass A:\n    x = 1\n\n"}
    assert C.build_prompt(rec, 2000) == (rec["context"] + rec["header"], 4)
    assert C.build_prompt(rec, 12) == ("    x = 1\n\n" + rec["header"], 4)
    assert C.build_prompt(rec, 0) == ("def m(self):\n    '''Doc.'''\n", 0)


# ---- held-out split and headers ----------------------------------------------------------------------------------
def test_heldout_split_is_stable():
    keys = [f"stdlib/mod{i}.py" for i in range(3000)]
    held = [k for k in keys if H.is_heldout(k)]
    assert 0.015 < len(held) / len(keys) < 0.045
    assert held == [k for k in keys if H.is_heldout(k)]
    assert H.is_heldout("stdlib/colorsys.py") and not H.is_heldout("stdlib/os.py")  # fixed across machines


def test_header_records():
    src = ("import os\n\n\nclass A:\n    @staticmethod\n    def m(a, b):\n        '''Add.'''\n        c = a + b\n"
           "        return c\n\n    def short(self): return 1\n\n    def doc_only(self):\n        '''Only.'''\n\n\n"
           "def top(x):\n    # comment\n    return x\n")
    recs = {r["name"]: r for r in H.file_headers("stdlib/x.py", src)}
    assert set(recs) == {"m", "top"}  # one-line and docstring-only functions have nothing to write
    m = recs["m"]
    assert m["header"] == "    @staticmethod\n    def m(a, b):\n        '''Add.'''\n" and m["indent"] == 4
    assert m["reference"] == "        c = a + b\n        return c\n"
    assert m["context"] == "import os\n\n\nclass A:\n" and m["line"] == 5
    assert recs["top"]["header"] == "def top(x):\n    # comment\n"
    for r in recs.values():
        ast.parse(H.dedent(r["header"] + r["reference"], r["indent"]))


# ---- the bundled demo model ---------------------------------------------------------------------------------------
DEMO = Path(__file__).resolve().parent.parent / "qnext" / "assets" / "demo"


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no bundled demo model")
def test_demo_checkpoint_files():
    from qnext.config import ModelConfig
    from qnext.default_model import default_model_path

    assert default_model_path() == DEMO
    sizes = {p.name: p.stat().st_size for p in DEMO.iterdir()}
    assert sum(sizes.values()) <= 25e6 and max(sizes.values()) <= 15e6
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "model.safetensors.index.json"):
        assert name in sizes
    cfg = ModelConfig.from_hf(DEMO)
    assert cfg.attention_layer_ids and cfg.linear_layer_ids and cfg.num_experts > 1
    assert cfg.shared_expert_intermediate_size > 0
    index = json.loads((DEMO / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]  # Qwen's per-expert names
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    added = {t["content"]: t["special"] for t in tok["added_tokens"]}
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>",
              "<|fim_suffix|>"):
        assert t in added
    assert added["<tool_call>"] is False and added["</tool_response>"] is False and added["<|im_end|>"] is True


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no bundled demo model")
def test_demo_model_loads_and_writes_python():
    from qnext import LLM, SamplingParams

    llm = LLM(device="cpu", dtype="float32", max_num_seqs=2)  # no model: the bundled demo
    prompt = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 1 and out.text.strip()
    chat = llm.chat([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                    SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)[0].outputs[0]
    assert chat.text.strip()
