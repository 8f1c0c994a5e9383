"""Scheduler: token budget, chunked prefill, admission limits, preemption, abort; integrity after every step."""

import random

import pytest

from qnext.cache.block_pool import BlockPool
from qnext.cache.state_slots import StateSlotPool
from qnext.engine.request import Request, RequestStatus
from qnext.engine.scheduler import QueueFullError, Scheduler


def make(num_blocks=64, block_size=4, max_num_seqs=4, budget=16, max_queue=8, max_model_len=256):
    return Scheduler(BlockPool(num_blocks, block_size), StateSlotPool(max_num_seqs), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_queue=max_queue, max_model_len=max_model_len)


def req(rid, prompt_len, max_tokens=4):
    return Request(str(rid), list(range(1, prompt_len + 1)), max_tokens=max_tokens)


def step(s):
    """One engine step without a model: a token is 'sampled' for every last chunk."""
    out = s.schedule()
    s.check_integrity()
    assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= s.max_num_batched_tokens
    for x in out.scheduled:
        if x.is_last_chunk:
            r = x.request
            r.append_token(1000 + r.num_tokens)
            if r.num_output_tokens >= r.max_tokens:
                s.finish_request(r, RequestStatus.FINISHED_LENGTH)
    s.check_integrity()
    return out


def lens(out):
    return {x.request.request_id: x.num_new_tokens for x in out.scheduled}


def test_chunked_prefill_then_decode():
    s = make(budget=4)
    r = req("a", 10, max_tokens=3)
    s.add_request(r)
    outs = [step(s) for _ in range(5)]
    assert [lens(o) for o in outs] == [{"a": 4}, {"a": 4}, {"a": 2}, {"a": 1}, {"a": 1}]
    assert [o.scheduled[0].is_last_chunk for o in outs] == [False, False, True, True, True]
    assert r.output_token_ids == [1010, 1011, 1012] and r.is_finished and r.finish_reason == "length"
    assert not s.has_unfinished_requests() and s.pool.num_used == 0 and s.slots.num_used == 0


def test_decodes_first_then_prefill_chunks_fill_budget():
    s = make(budget=8)
    for i in range(3):
        s.add_request(req(i, 2, max_tokens=10))
    assert lens(step(s)) == {"0": 2, "1": 2, "2": 2}
    s.add_request(req("long", 20))
    # three decodes first, then the rest of the budget goes to the new prompt
    out = step(s)
    assert lens(out) == {"0": 1, "1": 1, "2": 1, "long": 5}
    assert [x.request.request_id for x in out.scheduled][:3] == ["0", "1", "2"]
    assert lens(step(s)) == {"0": 1, "1": 1, "2": 1, "long": 5}
    out = step(s)
    assert lens(out) == {"0": 1, "1": 1, "2": 1, "long": 5}
    assert lens(step(s)) == {"0": 1, "1": 1, "2": 1, "long": 5}   # 20 = 4 * 5: last chunk samples
    assert lens(step(s)) == {"0": 1, "1": 1, "2": 1, "long": 1}


def test_running_prefill_chunks_go_before_new_admissions():
    s = make(budget=6)
    s.add_request(req("a", 10))
    s.add_request(req("b", 10))
    assert lens(step(s)) == {"a": 6}
    assert lens(step(s)) == {"a": 4, "b": 2}
    assert lens(step(s)) == {"a": 1, "b": 5}


def test_max_num_seqs_limits_running():
    s = make(max_num_seqs=2, budget=100)
    for i in range(5):
        s.add_request(req(i, 3, max_tokens=2))
    assert lens(step(s)) == {"0": 3, "1": 3}
    assert len(s.running) == 2 and len(s.waiting) == 3
    step(s)                                       # 0 and 1 finish (2 tokens each)
    assert lens(step(s)) == {"2": 3, "3": 3}
    while s.has_unfinished_requests():
        step(s)


def test_queue_bound():
    s = make(max_num_seqs=2, max_queue=3)
    for i in range(5):
        s.add_request(req(i, 3))
    with pytest.raises(QueueFullError):
        s.add_request(req("x", 3))
    step(s)                                       # two run, three wait: still full
    with pytest.raises(QueueFullError):
        s.add_request(req("x", 3))
    s.abort_request("4")
    s.add_request(req("x", 3))
    s.check_integrity()


def test_rejects_what_can_never_fit():
    s = make(num_blocks=8, block_size=4, max_model_len=40)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("a", 38, max_tokens=3))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        s.add_request(req("b", 30, max_tokens=4))   # 33 cached tokens > 8 pages of 4
    s.add_request(req("c", 29, max_tokens=4))       # 32 cached tokens: exactly the pool
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("d", 0))
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("c", 3))
    assert list(s.requests) == ["c"]
    while s.has_unfinished_requests():
        step(s)


def test_preempts_newest_and_recomputes_prompt_plus_outputs():
    # 6 pages of 4 tokens; two requests of 8-token prompts that each grow to 8 + 8
    s = make(num_blocks=6, block_size=4, budget=64)
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    preempted_at = None
    for i in range(40):
        out = step(s)
        if out.preempted:
            assert [r.request_id for r in out.preempted] == ["b"]      # the newest running request
            assert s.waiting[0] is b and b.num_computed_tokens == 0 and b.block_ids == []
            assert b.status is RequestStatus.PREEMPTED and b.num_output_tokens > 0  # outputs kept
            assert "b" not in lens(out)                                # nothing of b runs this step
            preempted_at = (i, b.num_tokens)
            break
    assert preempted_at is not None and s.num_preemptions == 1
    # b comes back when a finishes and re-prefills prompt + outputs in one chunk, then samples
    while b.status is not RequestStatus.RUNNING:
        out = step(s)
    assert lens(out)["b"] == preempted_at[1] and out.scheduled[-1].is_last_chunk
    while s.has_unfinished_requests():
        step(s)
    assert a.num_output_tokens == b.num_output_tokens == 8
    # outputs are the same as without preemption: the fake sampler depends only on the position
    assert b.output_token_ids == [1000 + 8 + i for i in range(8)]


def test_abort_frees_everything():
    s = make(budget=5)
    s.add_request(req("a", 12))
    s.add_request(req("b", 2))
    step(s)
    assert s.pool.num_used > 0 and s.slots.num_used == 1
    s.abort_request("a")
    s.abort_request("b")
    assert s.abort_request("missing") is None
    assert s.pool.num_used == 0 and s.slots.num_used == 0 and not s.has_unfinished_requests()
    s.check_integrity()


def test_randomized_workload_keeps_integrity():
    rng = random.Random(1)
    s = make(num_blocks=24, block_size=4, max_num_seqs=5, budget=12, max_queue=100, max_model_len=96)
    expected = {}
    for i in range(60):
        r = req(i, rng.randint(1, 40), max_tokens=rng.randint(1, 20))
        s.add_request(r)
        expected[r.request_id] = r
        for _ in range(rng.randint(0, 3)):
            step(s)
        if rng.random() < 0.1:
            s.abort_request(str(rng.randrange(i + 1)))
    for _ in range(5000):
        if not s.has_unfinished_requests():
            break
        step(s)
    assert not s.has_unfinished_requests() and s.pool.num_used == 0 and s.slots.num_used == 0
    assert s.num_preemptions > 0
    for r in expected.values():
        assert r.is_finished
        if r.finish_reason == "length":
            assert r.output_token_ids == [1000 + r.num_prompt_tokens + k for k in range(r.max_tokens)]
