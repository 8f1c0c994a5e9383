"""StateSlotPool: the GDN state slots (conv window + recurrent state), one per running sequence.

A slot's tensors live in ModelCache (`conv[layer][slot]`, `ssm[layer][slot]`); this class only hands out ids.
A freshly allocated slot holds stale data from its last owner: the runner marks the sequence's first chunk
with has_initial_state=False so the model starts from zeros instead of reading it.
Invariant (check_integrity): every slot is free xor owned by exactly one holder. A prefix cache will later
copy snapshots into extra slots; it would own them like any other holder.
"""

from __future__ import annotations

from collections.abc import Mapping


class OutOfSlotsError(RuntimeError):
    """allocate() with no free slot; the scheduler checks num_free first."""


class StateSlotPool:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._owned = [False] * num_slots
        # LIFO: reuse the most recently freed slot (its memory is likely still in cache)
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfSlotsError(f"all {self.num_slots} GDN state slots are in use")
        slot = self._free.pop()
        self._owned[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if not self._owned[slot]:
            raise AssertionError(f"GDN state slot {slot} freed but not owned")
        self._owned[slot] = False
        self._free.append(slot)

    def check_integrity(self, owners: Mapping[object, int] | None = None) -> None:
        """Every slot free xor owned; with `owners` (holder -> slot), exactly the owned slots are listed, once."""
        free = set(self._free)
        assert len(free) == len(self._free), "a GDN state slot is on the free list twice"
        for s in range(self.num_slots):
            assert self._owned[s] != (s in free), f"GDN state slot {s}: owned={self._owned[s]}, free={s in free}"
        if owners is not None:
            listed = list(owners.values())
            assert len(listed) == len(set(listed)), "two holders share a GDN state slot"
            assert set(listed) == {s for s in range(self.num_slots) if self._owned[s]}, (
                f"GDN slot owners {sorted(listed)} disagree with the pool's owned slots")
