"""ClientSlots: each client's unclaimed slots are bounded; a waiter over its share is
woken by its own release and refused after the bound; other clients pass."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.errors import ResourceExhausted
from gpu_service.client_slots import ClientSlots, client_of


@pytest.mark.parametrize("peer,client", [
    ("ipv4:10.0.0.7:53211", "ipv4:10.0.0.7"),
    ("ipv6:[::1]:5", "ipv6:[::1]"),
    ("unix:/tmp/sock", "unix"),
    ("", "unknown"),
])
def test_client_is_the_peer_host(peer, client):
    assert client_of(peer) == client


def test_share_is_bounded_per_client_and_others_pass():
    async def go():
        slots = ClientSlots(cap=2, wait_s=0.3)
        await slots.acquire("a")
        await slots.acquire("a")
        await slots.acquire("b")  # another client is not held up by a's share
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match="limit 2 per client"):
            await slots.acquire("a")
        assert 0.25 <= time.monotonic() - t0 < 2.0  # waited its bound, no longer

        waiter = asyncio.create_task(slots.acquire("a"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        slots.release("a")  # claimed or freed: the waiter goes on at once
        await asyncio.wait_for(waiter, 0.2)
        assert slots.held == {"a": 2, "b": 1}
        for c in ("a", "a", "b"):
            slots.release(c)
        assert not slots.held and not slots._freed  # nothing kept per departed client

    asyncio.run(go())
