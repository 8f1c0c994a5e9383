"""`qnext generate` and `qnext chat` as real subprocesses on a tiny checkpoint written here."""

import subprocess
import sys

import pytest

from qnext.config import EngineConfig
from qnext.engine.llm_engine import LLMEngine
from qnext.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qnext.weights.checkpoint_writer import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", dtype="float32")


def qnext(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qnext", *args], input=stdin, capture_output=True, text=True,
                          timeout=240)


ENGINE = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64"]


def test_generate_streams_the_greedy_completion(ckpt):
    r = qnext("generate", "--model", str(ckpt), "def fib(n):", "--max-tokens", "6", "--temperature", "0",
              "--ignore-eos", *ENGINE)
    assert r.returncode == 0, r.stderr
    engine = LLMEngine.from_pretrained(ckpt, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64))
    engine.add_request("x", engine.tokenizer.encode("def fib(n):"),
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    text = ""
    while engine.has_unfinished_requests():
        text += "".join(o.outputs[0].delta_text for o in engine.step())
    assert r.stdout == "def fib(n):" + text + "\n"
    assert "6 generated tokens" in r.stderr and "loading weights" in r.stderr


def test_generate_in_process_errors_and_token_ids(ckpt, tmp_path, capsys):
    from qnext.cli import main
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi", *ENGINE]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), *ENGINE]) == 2
    assert "give a prompt" in capsys.readouterr().err
    rc = main(["generate", "--model", str(ckpt), "--prompt-token-ids", "1,2,3", "--max-tokens", "3",
               "--temperature", "0", "--ignore-eos", *ENGINE])
    assert rc == 0 and "3 generated tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "hi", "--kv-cache-dtype", "int8", *ENGINE]) == 2
    assert "kv_cache_dtype must be auto or fp8, got 'int8'" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "hi", "--ssm-state-dtype", "fp16", *ENGINE]) == 2
    assert "ssm_state_dtype must be float32 or bfloat16" in capsys.readouterr().err
    rc = main(["generate", "--model", str(ckpt), "--prompt-token-ids", "1,2,3", "--max-tokens", "3", "--ignore-eos",
               "--kv-cache-dtype", "fp8", "--ssm-state-dtype", "bfloat16", *ENGINE])
    assert rc == 0 and "3 generated tokens" in capsys.readouterr().err


def test_chat_keeps_history_and_exits(ckpt):
    r = qnext("chat", "--model", str(ckpt), "--max-tokens", "4", "--temperature", "0", *ENGINE,
              stdin="hello\nand again\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2          # two replies, each ended by a newline
