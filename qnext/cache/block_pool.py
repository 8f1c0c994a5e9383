"""BlockPool: the KV pages of the attention layers, as plain Python over page ids.

A page holds `block_size` consecutive tokens of one sequence in every attention layer (the tensors live in
ModelCache; this class only hands out ids). Each page has a reference count:
    ref == 0  <=>  the page is on the free list (exactly once)
    ref >= 1  <=>  the page is owned by `ref` holders (today always one request; a prefix cache will later
                   share full pages between requests by raising ref, and keep freed pages hashed for reuse)
`check_integrity` asserts this invariant, optionally against the owners' own page lists.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence


class OutOfBlocksError(RuntimeError):
    """allocate() asked for more pages than are free; the scheduler checks can_allocate first."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        # FIFO: a freed page goes to the back, so recently freed pages are reused last (friendlier to a
        # future prefix cache that revives them).
        self._free: deque[int] = deque(range(num_blocks))

    # ---- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Pages needed to hold num_tokens tokens of one sequence."""
        return cdiv(max(num_tokens, 0), self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    # ---- allocate / free ------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n fresh pages, each with ref 1."""
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV pages, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each page; a page whose count reaches zero returns to the free list.

        Pages are freed last-first so that a sequence's tail goes back before its head.
        """
        for b in reversed(list(blocks)):
            if self._ref[b] <= 0:
                raise AssertionError(f"KV page {b} freed but not owned")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- invariant ------------------------------------------------------------------------------
    def check_integrity(self, owners: Mapping[object, Sequence[int]] | None = None) -> None:
        """Every page is free xor owned; with `owners` (holder -> its pages), each page's ref equals the
        number of times the holders list it, and a free page is listed by none."""
        free = list(self._free)
        assert len(free) == len(set(free)), "a KV page is on the free list twice"
        free_set = set(free)
        for b in range(self.num_blocks):
            assert (self._ref[b] == 0) == (b in free_set), f"KV page {b}: ref {self._ref[b]}, free={b in free_set}"
        if owners is not None:
            counts = [0] * self.num_blocks
            for holder, blocks in owners.items():
                assert len(blocks) == len(set(blocks)), f"{holder!r} lists a KV page twice"
                for b in blocks:
                    counts[b] += 1
            assert counts == self._ref, (
                "KV page owners disagree with ref counts: "
                + str([(b, counts[b], self._ref[b]) for b in range(self.num_blocks) if counts[b] != self._ref[b]][:8]))
