"""FreeList (the region's payload allocator): random alloc/free sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.freelist import FreeList

ops = st.lists(st.tuples(st.booleans(), st.integers(1, 40_000), st.integers(0, 1000)),
               max_size=120)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_blocks_never_overlap_and_space_is_conserved(ops):
    fl = FreeList(8192, 256 * 1024, 4096)
    live: dict[int, int] = {}
    for is_alloc, n, pick in ops:
        if is_alloc or not live:
            off = fl.alloc(n)
            if off is None:  # refused only when no free block is big enough
                assert fl.largest < fl.round(n)
                continue
            assert off % 4096 == 0 and off >= 8192 and off + fl.round(n) <= 8192 + 256 * 1024
            for o, m in live.items():
                assert off + fl.round(n) <= o or o + m <= off, "overlap"
            live[off] = fl.round(n)
        else:
            off = sorted(live)[pick % len(live)]
            fl.free(off, live.pop(off))
        assert fl.free_bytes + sum(live.values()) == 256 * 1024
    for off, n in list(live.items()):
        fl.free(off, n)
    assert fl.blocks == 1 and fl.largest == 256 * 1024  # fully coalesced


def test_first_fit_reuses_the_lowest_hole_and_rejects_double_free():
    fl = FreeList(0, 10 * 4096, 4096)
    a, b, c = fl.alloc(4096), fl.alloc(8192), fl.alloc(4096)
    assert (a, b, c) == (0, 4096, 12288)
    fl.free(b, 8192)
    assert fl.alloc(100) == 4096 and fl.alloc(4096) == 8192
    fl.free(0, 4096)
    with pytest.raises(AssertionError, match="double free"):
        fl.free(0, 4096)
