"""The project's one first-fit allocator: a sorted list of free (offset, size) blocks,
coalesced on free, requests rounded up to `align`. It places the KV region's slots
(transport/region.py), the U55C's per-channel buffers (fpga_service/device/base.py),
KV areas inside the HBM channels (kernels/hbm_layout.py) and chunks of the decode
engine's pinned ingest ring (engine/paged_runner.py). Counts are small (tens to
hundreds of live blocks), so a list is plenty. Not thread-safe: callers lock.
"""

from __future__ import annotations

import bisect


class FreeList:
    def __init__(self, start: int, size: int, align: int) -> None:
        self.start, self.size, self.align = start, size, align
        self._offs: list[int] = [start] if size else []
        self._sizes: list[int] = [size] if size else []

    def round(self, n: int) -> int:
        return max(self.align, -(-n // self.align) * self.align)

    def alloc(self, n: int) -> int | None:
        """Offset of a fresh block of `round(n)` bytes, or None when none is big enough."""
        n = self.round(n)
        for i, size in enumerate(self._sizes):
            if size >= n:
                off = self._offs[i]
                if size == n:
                    del self._offs[i], self._sizes[i]
                else:
                    self._offs[i] += n
                    self._sizes[i] -= n
                return off
        return None

    def free(self, off: int, n: int) -> None:
        n = self.round(n)
        i = bisect.bisect_left(self._offs, off)
        if (i < len(self._offs) and self._offs[i] < off + n) or (
                i > 0 and self._offs[i - 1] + self._sizes[i - 1] > off):
            raise AssertionError(f"double free or overlap at [{off}, {off + n})")
        self._offs.insert(i, off)
        self._sizes.insert(i, n)
        if i + 1 < len(self._offs) and off + n == self._offs[i + 1]:  # merge right
            self._sizes[i] += self._sizes.pop(i + 1)
            self._offs.pop(i + 1)
        if i > 0 and self._offs[i - 1] + self._sizes[i - 1] == off:  # merge left
            self._sizes[i - 1] += self._sizes.pop(i)
            self._offs.pop(i)

    def sizes(self) -> list[int]:
        """The free blocks' sizes."""
        return list(self._sizes)

    @property
    def free_bytes(self) -> int:
        return sum(self._sizes)

    @property
    def largest(self) -> int:
        return max(self._sizes, default=0)

    @property
    def blocks(self) -> int:
        return len(self._sizes)
