"""Helpers shared by tests/test_services_*.py: counters from ServiceInfo.counters,
raw stubs, local reference generation."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import time

import grpc

from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg


async def _info(target: str, stub_cls) -> pb.ServiceInfo:
    async with grpc.aio.insecure_channel(target) as ch:
        return await stub_cls(ch).Info(pb.InfoRequest(), timeout=10)


def counters(target: str, role: str) -> dict[str, int]:
    """ServiceInfo.counters of a service (0 for ones not yet reported)."""
    stub = pbg.PrefillServiceStub if role == "prefill" else pbg.DecodeServiceStub
    return CounterDict(asyncio.run(_info(target, stub)).counters)


class CounterDict(dict):
    def __missing__(self, key: str) -> int:
        return 0


def wait_until(pred, timeout_s: float, period_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period_s)
    return pred()


def slots_in_use(prefill: str) -> int:
    return counters(prefill, "prefill")["slots-in-use"]


def local_tokens(lm, prompt_ids: list[int], max_new: int, params) -> list[int]:
    from engine.generate import generate

    return generate(lm, prompt_ids, max_new, params).token_ids


def shm_segments() -> set[str]:
    return set(glob.glob("/dev/shm/hybrid-kv*"))


@contextlib.contextmanager
def raw_stubs(pair):
    """Blocking (prefill, decode) stubs of a ServicePair, channels closed after."""
    with grpc.insecure_channel(pair.prefill) as pch, grpc.insecure_channel(pair.decode) as dch:
        yield pbg.PrefillServiceStub(pch), pbg.DecodeServiceStub(dch)
