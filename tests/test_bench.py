"""`qnext bench serve` (metrics definitions, the load against a real server, warm-ups kept out of the figures) and
`qnext bench latency` (runs in process on the tiny preset and writes its JSON)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qnext.bench.serve_metrics import RequestResult, Slo, aggregate
from tests.server_fixture import ServerProcess, tiny_checkpoint


def test_aggregate_follows_the_vllm_definitions():
    a = RequestResult(prompt_len=10, success=True, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4)
    b = RequestResult(prompt_len=20, success=True, output_tokens=1, ttft=0.3, latency=0.3)
    failed = RequestResult(prompt_len=30, error="boom")
    m = aggregate([a, b, failed], duration_s=2.0, percentiles=[50, 99], slo=Slo.parse(["ttft:200"]))
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 6)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT only for outputs longer than one token: (0.5 - 0.1) / 4
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["p99_itl_ms"] == pytest.approx(100.0)
    assert m["request_goodput"] == pytest.approx(0.5)     # only `a` has TTFT <= 200 ms
    with pytest.raises(ValueError, match="--goodput"):
        Slo.parse(["latency:5"])


@pytest.fixture(scope="module")
def server():
    with ServerProcess(tiny_checkpoint(), "--max-num-seqs", "4") as srv:
        yield srv


def test_bench_serve_measures_the_prompts_and_not_the_warmups(server, tmp_path):
    before = server.wait_idle()
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "qnext", "bench", "serve", "--base-url", server.base_url,
           "--tokenizer", str(tiny_checkpoint()), "--random-input-len", "24", "--random-output-len", "6",
           "--num-prompts", "5", "--num-warmups", "2", "--max-concurrency", "2", "--ignore-eos",
           "--result-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Output token throughput" in proc.stdout
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert (m["completed"], m["failed"]) == (5, 0)
    assert m["total_output_tokens"] == 5 * 6 and m["total_input_tokens"] == 5 * 24
    assert len(result["requests"]) == 5
    assert all(len(r["itl"]) >= 1 for r in result["requests"])
    after = server.wait_idle()
    # the server generated for the warm-ups too: 7 requests of 6 tokens
    generated = after["qnext:generation_tokens_total"] - before["qnext:generation_tokens_total"]
    assert generated == 7 * 6


def test_bench_latency_runs_the_tiny_preset(tmp_path):
    out = tmp_path / "lat.json"
    cmd = [sys.executable, "-m", "qnext", "bench", "latency", "--synthetic", "--model", "tiny", "--device", "cpu",
           "-p", "32", "-d", "16", "-n", "4", "-b", "1,2", "--repeats", "1", "--result-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["test"] for r in rows] == ["pp32", "tg4 b1 @ d16", "tg4 b2 @ d16"]
    assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in rows)


def test_random_prompts_reencode_to_their_lengths_batched_as_one_by_one():
    """The random dataset's prompts re-encode to the asked token counts, and the batched tokenizer calls give the
    prompts that one call per prompt gives (same seed, same prompts as before batching)."""
    from qnext.bench.random_dataset import random_prompts
    from qnext.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_checkpoint())

    class OneByOne:                                     # the same tokenizer, one call per prompt
        vocab_size, all_special_ids = tok.vocab_size, tok.all_special_ids

        def encode_batch(self, texts):
            return [tok.encode(t) for t in texts]

        def decode_batch(self, id_lists, skip_special_tokens):
            return [tok.decode(ids, skip_special_tokens=skip_special_tokens) for ids in id_lists]

    batched = random_prompts(tok, 6, 40, 5, range_ratio=0.5, prefix_len=3, seed=7)
    assert batched == random_prompts(OneByOne(), 6, 40, 5, range_ratio=0.5, prefix_len=3, seed=7)
    assert len({p.prompt_len for p in batched}) > 1
    for p in batched:
        assert len(tok.encode(p.text)) == p.prompt_len
