"""BlockPool and StateSlotPool: allocate/free bookkeeping and the free-xor-owned invariant."""

import random

import pytest

from qnext.cache.block_pool import BlockPool, OutOfBlocksError
from qnext.cache.state_slots import OutOfSlotsError, StateSlotPool


def test_block_pool_allocate_free_counts():
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.blocks_for_tokens(0) == 0 and pool.blocks_for_tokens(1) == 1
    assert pool.blocks_for_tokens(4) == 1 and pool.blocks_for_tokens(5) == 2
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a) | set(b)) == 8 and pool.num_free == 0 and pool.usage == 1.0
    assert not pool.can_allocate(1)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)
    pool.check_integrity({"a": a, "b": b})
    pool.free(a)
    assert pool.num_free == 3 and pool.num_used == 5
    pool.check_integrity({"b": b})
    with pytest.raises(AssertionError):
        pool.check_integrity({"a": a, "b": b})  # a's pages are free now
    with pytest.raises(AssertionError):
        pool.free(a)                              # double free
    pool.free(b)
    assert pool.num_free == 8
    pool.check_integrity({})


def test_block_pool_randomized_integrity():
    rng = random.Random(0)
    pool = BlockPool(num_blocks=37, block_size=16)
    owners: dict[int, list[int]] = {}
    for step in range(2000):
        if owners and (rng.random() < 0.45 or not pool.can_allocate(1)):
            pool.free(owners.pop(rng.choice(list(owners))))
        else:
            n = rng.randint(0, pool.num_free)
            owners[step] = pool.allocate(n)
        pool.check_integrity(owners)
    assert pool.num_used == sum(len(b) for b in owners.values())


def test_block_pool_detects_corruption():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = pool.allocate(2)
    pool.check_integrity({"a": a})
    with pytest.raises(AssertionError):
        pool.check_integrity({"a": a, "b": [a[0]]})  # one page owned twice, ref says once
    pool._free.append(a[0])                         # a page both owned and free
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_state_slots():
    slots = StateSlotPool(3)
    got = [slots.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and slots.num_free == 0
    with pytest.raises(OutOfSlotsError):
        slots.allocate()
    slots.check_integrity({"r0": got[0], "r1": got[1], "r2": got[2]})
    slots.free(got[1])
    assert slots.num_used == 2
    slots.check_integrity({"r0": got[0], "r2": got[2]})
    with pytest.raises(AssertionError):
        slots.check_integrity({"r0": got[0], "r2": got[0]})
    with pytest.raises(AssertionError):
        slots.free(got[1])
    assert slots.allocate() == got[1]  # most recently freed first
    with pytest.raises(ValueError):
        StateSlotPool(0)
