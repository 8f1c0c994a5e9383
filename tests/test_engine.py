"""LLMEngine on a tiny float32 checkpoint written here: batching, chunking and preemption never change greedy
outputs; the engine equals a plain model.forward greedy loop; aborts and finishes free every page and slot."""

import random

import pytest
import torch

from qnext.cache.model_cache import ModelCache
from qnext.config import EngineConfig
from qnext.engine.forward_batch import ForwardBatch
from qnext.engine.llm_engine import LLMEngine
from qnext.engine.scheduler import QueueFullError
from qnext.sampling_params import SamplingParams

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qnext.weights.checkpoint_writer import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", dtype="float32", tokenizer=False)


@pytest.fixture(scope="module")
def loaded(ckpt):
    """(model, model_config) loaded once; each test builds engines (fresh caches) around them."""
    engine = LLMEngine.from_pretrained(ckpt, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=4))
    return engine.model, engine.model_config


def make_engine(loaded, **kw) -> LLMEngine:
    kw = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_kv_blocks": 256, **kw}
    return LLMEngine(loaded[0], loaded[1], EngineConfig(**kw))


def run(engine: LLMEngine, requests: dict) -> dict[str, list[int]]:
    """Add every (prompt, params), step to the end checking integrity; request id -> output token ids."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done, deltas = {}, {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            deltas[out.request_id] += c.delta_token_ids
            if out.finished:
                done[out.request_id] = c.token_ids
                assert c.token_ids == deltas[out.request_id]     # the deltas add up to the final output
            else:
                assert (c.token_ids, c.text, c.logprobs) == ([], "", None)  # running: deltas only
        engine.check_integrity()
    s = engine.stats()
    assert (s.kv_pages_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0)
    return done


def greedy(max_tokens=MAX_TOKENS):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(loaded):
    rng = random.Random(0)
    vocab = loaded[1].vocab_size
    lens = [1, 2, 3, 5, 7, 9, 12, 15, 17, 20, 23, 26, 30, 33, 37, 41, 47]
    return {f"g{i}": [rng.randrange(vocab) for _ in range(n)] for i, n in enumerate(lens)}


@pytest.fixture(scope="module")
def alone(loaded, prompts):
    """Each greedy prompt run by itself in a fresh engine."""
    return {rid: run(make_engine(loaded), {rid: (p, greedy())})[rid] for rid, p in prompts.items()}


def test_engine_equals_plain_greedy_loop(loaded, prompts, alone):
    model, cfg = loaded
    for rid in ("g0", "g6", "g16"):
        prompt = prompts[rid]
        cache = ModelCache(cfg, num_blocks=16, block_size=4, num_slots=1, dtype=torch.float32)
        batch = ForwardBatch.for_prompts([prompt], block_size=4, max_len=len(prompt) + MAX_TOKENS)
        out = []
        with torch.inference_mode():
            for _ in range(MAX_TOKENS):
                hidden = model(batch, cache)
                tok = int(model.compute_logits(hidden[batch.logits_indices]).argmax(-1)[0])
                out.append(tok)
                batch = batch.next_decode([tok])
        assert alone[rid] == out, rid


def test_batched_with_sampled_neighbours_identical(loaded, prompts, alone):
    reqs = {rid: (p, greedy()) for rid, p in prompts.items()}
    vocab = loaded[1].vocab_size
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, seed=7, ignore_eos=True)
    for i in range(4):  # sampled neighbours, two of them seeded
        params = seeded if i < 2 else SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS + i, ignore_eos=True)
        reqs[f"s{i}"] = ([(i * 37 + k) % vocab for k in range(5 + 9 * i)], params)
    engine = make_engine(loaded, max_num_seqs=32)
    got = run(engine, reqs)
    assert {rid: got[rid] for rid in prompts} == alone
    # a seed gives the same tokens whatever the batch mates
    seeded_alone = run(make_engine(loaded), {"s0": reqs["s0"]})["s0"]
    assert got["s0"] == seeded_alone


def test_chunked_prefill_identical(loaded, prompts, alone):
    engine = make_engine(loaded, max_num_seqs=32, max_num_batched_tokens=5)
    got = run(engine, {rid: (p, greedy()) for rid, p in prompts.items()})
    assert got == alone


def test_preemption_identical(loaded, prompts, alone):
    # 16 pages of 4 tokens: the longest request (47 + 10) alone needs 15 pages
    engine = make_engine(loaded, max_num_seqs=8, num_kv_blocks=16, max_num_batched_tokens=32)
    got = run(engine, {rid: (p, greedy()) for rid, p in prompts.items()})
    assert engine.stats().num_preemptions > 0
    assert got == alone


def test_overlap_gives_the_plain_loops_outputs(loaded, prompts, alone):
    """Step n+1 queued before step n's tokens are read (the default) against no_overlap, under preemption: greedy
    and seeded rows, requests ended early by a stop token (their extra token is computed and dropped), a
    penalised row (steps holding it do not overlap) and an abort while a step is in flight."""
    def drive(no_overlap: bool):
        engine = make_engine(loaded, max_num_seqs=8, num_kv_blocks=16, max_num_batched_tokens=32,
                             no_overlap=no_overlap)
        reqs = {rid: (p, greedy()) for rid, p in prompts.items()}
        for rid in ("g2", "g9", "g14"):   # stop at the third token the request writes alone
            reqs[rid] = (prompts[rid], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                      stop_token_ids=[alone[rid][2]]))
        reqs["seeded"] = (prompts["g5"], SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=MAX_TOKENS,
                                                        ignore_eos=True))
        reqs["penalty"] = (prompts["g7"], SamplingParams(temperature=0.0, repetition_penalty=1.3,
                                                         max_tokens=MAX_TOKENS, ignore_eos=True))
        for rid, (p, params) in reqs.items():
            engine.add_request(rid, p, params)
        done, steps, overlapped = {}, 0, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
            steps += 1
            overlapped += engine._in_flight is not None
            if steps == 3:
                out = engine.abort_request("g3")
                done["g3"] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
            engine.check_integrity()
        s = engine.stats()
        assert (s.kv_pages_used, s.state_slots_used) == (0, 0)
        return done, overlapped, s

    plain, none, plain_stats = drive(no_overlap=True)
    got, overlapped, stats = drive(no_overlap=False)
    assert none == 0 and overlapped > 0 and stats.num_preemptions > 0
    assert got == plain
    assert got["g3"][1] == "abort" and got["g2"][1] == "stop" and got["g2"][0] == alone["g2"][:len(got["g2"][0])]
    assert stats.num_generation_tokens == plain_stats.num_generation_tokens


def test_abort_frees_pages_and_slots(loaded, prompts):
    engine = make_engine(loaded, max_num_seqs=4, max_num_batched_tokens=16)
    for rid, p in prompts.items():
        engine.add_request(rid, p, greedy())
    for _ in range(4):
        engine.step()
        engine.check_integrity()
    s = engine.stats()
    assert s.num_running == 4 and s.num_waiting == len(prompts) - 4 and s.kv_pages_used > 0
    final = engine.abort_request("g0")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.abort_request("g0") is None
    for rid in prompts:
        engine.abort_request(rid)
    engine.check_integrity()
    s = engine.stats()
    assert (s.kv_pages_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0)
    assert not engine.has_unfinished_requests()


def test_limits_and_stops(loaded):
    engine = make_engine(loaded, num_kv_blocks=8, max_num_seqs=1, max_queue=1)
    assert engine.max_model_len == 32                       # min(max_position_embeddings, 8 pages * 4)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [1] * 30, greedy(5))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("bad", [10**6], greedy())
    with pytest.raises(ValueError, match="no room"):
        engine.add_request("full", [1] * 32, SamplingParams(max_tokens=None))
    engine.add_request("a", [1, 2, 3], greedy(4))
    engine.add_request("b", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1, 2, 3], greedy())
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["a"].outputs[0].finish_reason == "length" and len(outs["a"].outputs[0].token_ids) == 4
    assert len(outs["b"].outputs[0].token_ids) == 32 - 3          # max_tokens=None: up to max_model_len
    # a stop token id ends the request with stop_reason = that id
    first = outs["a"].outputs[0].token_ids[0]
    stop = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first])
    engine.add_request("s", [1, 2, 3], stop)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    o = outs["s"].outputs[0]
    assert (o.finish_reason, o.stop_reason, o.token_ids) == ("stop", first, [first])
    m = outs["s"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    s = engine.stats()
    assert s.num_generation_tokens == 4 + 29 + 1 and s.num_prompt_tokens == 9


def test_cache_plan(loaded):
    from qnext.engine.cache_plan import GiB, plan_cache
    from qnext.model.state import kv_bytes_per_token, state_bytes_per_slot

    cfg, cpu, f32 = loaded[1], torch.device("cpu"), torch.float32
    block = 16 * kv_bytes_per_token(cfg, f32)
    slots = 2 * state_bytes_per_slot(cfg, f32)
    plan = plan_cache(cfg, EngineConfig(kv_cache_memory_gb=0.001, max_num_seqs=2), cpu, f32)
    assert plan.num_blocks == int((0.001 * GiB - slots) // block) and plan.num_slots == 2
    assert plan.max_model_len == min(cfg.max_position_embeddings, plan.num_blocks * 16)
    # never more pages than max_num_seqs sequences of max_model_len can use
    plan = plan_cache(cfg, EngineConfig(max_num_seqs=2, max_model_len=64), cpu, f32)
    assert plan.num_blocks == 2 * 64 // 16 and plan.max_model_len == 64
    with pytest.raises(ValueError, match="max_position_embeddings"):
        plan_cache(cfg, EngineConfig(max_model_len=cfg.max_position_embeddings + 1), cpu, f32)
    with pytest.raises(ValueError, match="max_num_seqs"):
        plan_cache(cfg, EngineConfig(kv_cache_memory_gb=slots / GiB, max_num_seqs=2), cpu, f32)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        plan_cache(cfg, EngineConfig(num_kv_blocks=4, max_model_len=100), cpu, f32)


def test_cache_formats_halve_bytes_and_stay_close(loaded, prompts):
    """kv_cache_dtype fp8 and ssm_state_dtype bfloat16: the cache holds those dtypes, the plan counts their bytes,
    and the prompt logprobs of chunked prefills (every chunk after the first reads K/V from the pages and the GDN
    state from its slot) stay close to a plain float32 forward's without being equal to them."""
    from qnext.engine.cache_plan import plan_cache
    from qnext.model.state import kv_bytes_per_token, state_bytes_per_slot

    model, cfg = loaded
    fmt = dict(kv_cache_dtype="fp8", ssm_state_dtype="bfloat16")
    engine = make_engine(loaded, max_num_seqs=4, max_num_batched_tokens=5, **fmt)
    k_cache, _ = next(iter(engine.cache.kv.values()))
    assert k_cache.dtype == torch.float8_e4m3fn
    assert {t.dtype for t in engine.cache.ssm.values()} == {torch.bfloat16}
    assert {t.dtype for t in engine.cache.conv.values()} == {torch.float32}          # the model dtype
    f32 = torch.float32
    plan = plan_cache(cfg, EngineConfig(num_kv_blocks=10, max_num_seqs=2, **fmt), torch.device("cpu"), f32)
    assert plan.kv_bytes == 10 * 16 * kv_bytes_per_token(cfg, f32) // 4
    assert plan.state_bytes == 2 * state_bytes_per_slot(cfg, f32, torch.bfloat16) < 2 * state_bytes_per_slot(cfg, f32)
    worst = 0.0
    for rid in ("g16", "g13"):                                                       # 47 and 33 tokens
        prompt = prompts[rid]
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
        got = None
        while engine.has_unfinished_requests():
            got = next((o.prompt_logprobs for o in engine.step() if o.finished), got)
        ref = _forward_logprobs(model, cfg, prompt)
        for j in range(1, len(prompt)):
            worst = max(worst, abs(got[j][prompt[j]].logprob - ref[j - 1, prompt[j]].item()))
    assert 1e-4 < worst < 0.05, worst


def test_default_token_budget(loaded, monkeypatch):
    from qnext.engine import cache_plan

    assert make_engine(loaded).engine_config.max_num_batched_tokens == 8192            # CPU
    assert make_engine(loaded, max_num_batched_tokens=40).scheduler.max_num_batched_tokens == 40

    class Props:
        def __init__(self, gib: int):
            self.total_memory = gib * cache_plan.GiB

    cuda = torch.device("cuda", 0)
    for gib, want in ((24, 8192), (80, 16384), (141, 16384)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, gib=gib: Props(gib))
        assert cache_plan.default_token_budget(cuda) == want


def _forward_logprobs(model, cfg, prompt: list[int]) -> torch.Tensor:
    """[P, V] log_softmax of a plain whole-prompt forward's logits at every position."""
    cache = ModelCache(cfg, num_blocks=16, block_size=4, num_slots=1, dtype=torch.float32)
    batch = ForwardBatch.for_prompts([prompt], block_size=4)
    with torch.inference_mode():
        hidden = model(batch, cache)
        return torch.log_softmax(model.compute_logits(hidden), dim=-1)


@pytest.mark.parametrize("engine_kw", [dict(max_num_seqs=8, max_num_batched_tokens=5),  # 5-token chunks
                                       dict(max_num_seqs=8, num_kv_blocks=16, max_num_batched_tokens=32)],
                         ids=["chunked", "preempted"])
def test_prompt_logprobs_match_plain_forward(loaded, prompts, engine_kw):
    """Across prefill chunks, batch mates and preemptions, prompt_logprobs equal a plain forward's: None first,
    then for token j the logprob (and rank) of prompt[j] from the logits at j - 1, plus the top-N."""
    model, cfg = loaded
    asks = {"g16": 3, "g12": 0, "g0": 2, "g9": 20, "g14": 1}     # 47, 30, 1, 20 and 37 prompt tokens
    reqs = {rid: (p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    prompt_logprobs=asks.get(rid))) for rid, p in prompts.items()}
    engine = make_engine(loaded, **engine_kw)
    preempted = []
    preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda r: (preempted.append((r.request_id, r.num_computed_tokens)), preempt(r))
    for rid, (p, params) in reqs.items():
        engine.add_request(rid, p, params)
    seen: dict[str, list] = {rid: [] for rid in reqs}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
        engine.check_integrity()
    if "num_kv_blocks" in engine_kw:  # some asking requests were preempted (and recomputed)
        assert {rid for rid, _ in preempted} & set(asks), preempted
    for rid, outs in seen.items():
        with_lps = [k for k, o in enumerate(outs) if o.prompt_logprobs is not None]
        if rid not in asks:
            assert not with_lps
            continue
        assert with_lps == sorted({0, len(outs) - 1})             # the first output and the final one
        got, prompt, n = outs[-1].prompt_logprobs, prompts[rid], asks[rid]
        assert len(got) == len(prompt) and got[0] is None
        ref = _forward_logprobs(model, cfg, prompt)
        for j in range(1, len(prompt)):
            row, tok = ref[j - 1], prompt[j]
            entry = got[j]
            assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4), (rid, j)
            assert entry[tok].rank == int((row > row[tok]).sum()) + 1
            top = row.topk(n).indices.tolist() if n else []
            assert set(entry) == set(top) | {tok}, (rid, j)
            for rank, t in enumerate(top, start=1):
                assert entry[t].rank == rank and entry[t].logprob == pytest.approx(row[t].item(), abs=1e-4)


def test_logprob_deltas_add_up(loaded, prompts):
    engine = make_engine(loaded)
    engine.add_request("a", prompts["g5"], SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=2,
                                                          ignore_eos=True))
    deltas, cum = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            assert len(c.delta_logprobs) == len(c.delta_token_ids) == 1
            assert c.delta_token_ids[0] in c.delta_logprobs[0] and len(c.delta_logprobs[0]) <= 3
            deltas += c.delta_logprobs
            cum.append(c.cumulative_logprob)
    assert c.logprobs == deltas and len(deltas) == 6
    running = 0.0
    for lp, tok, total in zip(deltas, c.token_ids, cum):
        running += lp[tok].logprob
        assert total == pytest.approx(running)


def test_pack_to_device_round_trips_every_dtype_on_cpu():
    from qnext.engine.host_device import pack_to_device

    parts = [([1, 2, 3], torch.int64), ([], torch.int32), ([4, -5, 6, 7, 8], torch.int32), ([True, False], torch.bool),
             ([9], torch.int64), ([0.5, -2.0], torch.float32), ([2**40, -1], torch.int64)]
    out = pack_to_device(parts, "cpu")
    for (data, dtype), t in zip(parts, out):
        assert t.dtype == dtype and t.shape == (len(data),)
        assert t.tolist() == torch.tensor(data, dtype=dtype).tolist()
    out[0][0] = 7                                     # writable, and parts do not overlap
    assert out[0].tolist() == [7, 2, 3] and out[2].tolist() == [4, -5, 6, 7, 8]
    with pytest.raises(OverflowError):
        pack_to_device([([2**40], torch.int32)], "cpu")


@pytest.mark.parametrize("kw", [dict(max_num_batched_tokens=32, max_num_seqs=8), dict(max_num_seqs=1, max_queue=0)])
def test_warm_up_leaves_nothing_behind(loaded, prompts, alone, kw):
    """LLMEngine.warm_up (automatic on CUDA) runs its requests to the end and leaves no pages, slots, counts or
    sampling state behind: outputs afterwards equal a fresh engine's, seeded sampling included."""
    seeded = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)   # the engine's own stream
    reqs = {"g3": (prompts["g3"], greedy()), "s": (prompts["g5"], seeded)}
    fresh = run(make_engine(loaded, **kw), {"s": reqs["s"]})
    engine = make_engine(loaded, **kw)
    engine.warm_up()
    engine.check_integrity()
    s = engine.stats()
    assert (s.kv_pages_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0)
    assert (s.num_prompt_tokens, s.num_generation_tokens) == (0, 0)
    assert run(engine, {"s": reqs["s"]}) == fresh
    assert run(engine, {"g3": reqs["g3"]})["g3"] == alone["g3"]


def test_warm_up_fits_a_short_context(loaded):
    engine = make_engine(loaded, max_model_len=40, max_num_batched_tokens=16)
    engine.warm_up()
    assert engine.stats().kv_pages_used == 0
