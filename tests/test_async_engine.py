"""AsyncEngine: concurrent streams match the sync engine, cancellation frees resources, queue bound, errors."""

import asyncio
import time

import pytest

from qnext.config import EngineConfig
from qnext.engine.async_engine import AsyncEngine
from qnext.engine.llm_engine import LLMEngine
from qnext.engine.scheduler import QueueFullError
from qnext.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from qnext.weights.checkpoint_writer import write_checkpoint
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", dtype="float32")
    engine = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=4))
    return engine.model, engine.model_config, engine.tokenizer


def make(loaded, **kw):
    kw = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_kv_blocks": 128, **kw}
    return AsyncEngine(LLMEngine(loaded[0], loaded[1], EngineConfig(**kw), tokenizer=loaded[2]))


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


async def collect(engine, rid, prompt, params):
    deltas, text, last = [], "", None
    async for out in engine.generate(rid, prompt, params):
        deltas += out.outputs[0].delta_token_ids
        text += out.outputs[0].delta_text
        last = out
    assert last.finished and last.outputs[0].token_ids == deltas and last.outputs[0].text == text
    return deltas


async def wait_idle(engine, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = engine.stats()
        if (s.num_running, s.num_waiting, s.kv_pages_used, s.state_slots_used) == (0, 0, 0, 0):
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_concurrent_streams_match_sync(loaded):
    prompts = {f"r{i}": [(7 * i + k) % 500 + 1 for k in range(3 + 4 * i)] for i in range(6)}
    sync = LLMEngine(loaded[0], loaded[1], EngineConfig(device="cpu", dtype="float32", block_size=4,
                                                        num_kv_blocks=128))
    expected = {}
    for rid, p in prompts.items():
        sync.add_request(rid, p, greedy(6))
        while sync.has_unfinished_requests():
            for o in sync.step():
                if o.finished:
                    expected[rid] = o.outputs[0].token_ids
    engine = make(loaded)

    async def main():
        got = await asyncio.gather(*(collect(engine, rid, p, greedy(6)) for rid, p in prompts.items()))
        await wait_idle(engine)
        return dict(zip(prompts, got))

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()


def test_cancel_frees_pages_and_slot(loaded):
    engine = make(loaded)

    async def main():
        agen = engine.generate("long", [1, 2, 3, 4, 5], greedy(200))
        first = await agen.__anext__()
        assert not first.finished
        assert engine.stats().kv_pages_used > 0 or engine.engine.has_unfinished_requests()
        await agen.aclose()                     # client disconnect
        await wait_idle(engine)
        # a task cancelled while waiting for output also aborts
        task = asyncio.ensure_future(collect(engine, "t", [1, 2, 3], greedy(500)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        # the id can be reused afterwards
        assert len(await collect(engine, "long", [1, 2, 3], greedy(3))) == 3

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_queue_full_and_bad_request_raise_on_first_await(loaded):
    engine = make(loaded, max_num_seqs=1, max_queue=1)

    async def main():
        a = engine.generate("a", [1, 2, 3], greedy(300))
        await a.__anext__()
        b = engine.generate("b", [1, 2, 3], greedy(3))
        b_task = asyncio.ensure_future(b.__anext__())
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await engine.generate("c", [1, 2, 3], greedy(3)).__anext__()
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.generate("d", [1, 2, 3], greedy(10**6)).__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate("a", [1], greedy(1)).__anext__()
        await a.aclose()
        await b_task
        await b.aclose()
        await wait_idle(engine)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_shutdown_fails_open_streams(loaded):
    engine = make(loaded)

    async def main():
        agen = engine.generate("x", [1, 2], greedy(400))
        await agen.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(RuntimeError, match="shut down"):
            async for _ in agen:
                pass
        with pytest.raises(RuntimeError, match="shut down"):
            await engine.generate("y", [1], greedy(1)).__anext__()

    asyncio.run(main())
    assert not engine._thread.is_alive()


def test_idle_engine_thread_sleeps(loaded):
    engine = make(loaded)
    try:
        asyncio.run(collect(engine, "warm", [1, 2, 3], greedy(2)))
        before = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - before < 0.05       # no busy spin while idle
        assert engine._thread.is_alive()
    finally:
        engine.shutdown()


def test_failed_step_kills_the_engine(loaded):
    """An exception out of a step is fatal: open streams and later requests get EngineDeadError, is_alive() is
    false with the cause in dead_reason, and the thread ends."""
    from qnext.engine.async_engine import EngineDeadError

    engine = make(loaded)

    async def main():
        assert engine.is_alive() and engine.dead_reason is None
        assert len(await collect(engine, "ok", [1, 2, 3], greedy(2))) == 2
        agen = engine.generate("x", [1, 2, 3], greedy(400))
        await agen.__anext__()
        real_step = engine.engine.step

        def poisoned():
            engine.engine.step = real_step  # once is enough to kill it
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        engine.engine.step = poisoned
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            async for _ in agen:
                pass
        assert not engine.is_alive() and "illegal memory access" in engine.dead_reason
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            await engine.generate("y", [1], greedy(1)).__anext__()

    try:
        asyncio.run(main())
        engine._thread.join(5)
        assert not engine._thread.is_alive() and not engine.is_alive()
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.kv_pages_used, s.state_slots_used) == (0, 0, 0, 0)
    finally:
        engine.shutdown()


def test_not_alive_after_shutdown_or_thread_death(loaded):
    engine = make(loaded)
    assert engine.is_alive()
    engine.shutdown()
    assert not engine.is_alive() and "shut down" in engine.dead_reason
    # a loop that dies outside a step (here: reading stats) is dead too, with its cause
    engine = make(loaded)
    try:
        engine.engine.stats = lambda: (_ for _ in ()).throw(MemoryError("host out of memory"))
        with pytest.raises(Exception):
            asyncio.run(collect(engine, "z", [1, 2], greedy(2)))
        engine._thread.join(5)
        assert not engine.is_alive() and "host out of memory" in engine.dead_reason
    finally:
        engine.shutdown()
