"""SlotQueue: requests wait in line for a region slot, one woken per free, bounded."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import ResourceExhausted
from gpu_service.slot_queue import SlotQueue


class Pool:
    """A region stand-in: n slots."""

    def __init__(self, n: int) -> None:
        self.free, self.attempts = n, 0

    def alloc(self) -> str:
        self.attempts += 1
        if self.free == 0:
            raise ResourceExhausted("full")
        self.free -= 1
        return "slot"


def test_waiters_get_freed_slots_in_arrival_order():
    async def go():
        pool, q, order = Pool(0), SlotQueue(wait_s=30), []

        async def want(i):
            await q.alloc(pool.alloc)
            order.append(i)

        tasks = [asyncio.create_task(want(i)) for i in range(4)]
        while q.waiting < 4:
            await asyncio.sleep(0)
        before = pool.attempts
        for _ in range(4):
            pool.free += 1
            q.wake_one()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        # one allocation attempt per free, not one per waiter
        assert pool.attempts - before == 4
        return order

    assert asyncio.run(go()) == [0, 1, 2, 3]


def test_a_full_region_is_refused_after_the_wait_with_a_retry_hint():
    async def go():
        with pytest.raises(ResourceExhausted, match="retry in"):
            await SlotQueue(wait_s=0.05).alloc(Pool(0).alloc)

    asyncio.run(go())


def test_each_freed_slot_wakes_one_waiter():
    async def go():
        pool, q = Pool(0), SlotQueue(wait_s=30)
        a = asyncio.create_task(q.alloc(pool.alloc))
        b = asyncio.create_task(q.alloc(pool.alloc))
        while q.waiting < 2:
            await asyncio.sleep(0)
        pool.free = 2  # two slots at once (the reaper wakes one waiter per slot)
        q.wake_one()
        q.wake_one()
        assert await asyncio.wait_for(asyncio.gather(a, b), 5) == ["slot", "slot"]

    asyncio.run(go())
