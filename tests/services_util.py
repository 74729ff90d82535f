"""Helpers shared by tests/test_services_*.py: counters from Info trailing metadata,
raw stubs, local reference generation."""

from __future__ import annotations

import asyncio
import glob
import time

import grpc

from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg


async def _info(target: str, stub_cls) -> tuple[pb.ServiceInfo, dict[str, str]]:
    async with grpc.aio.insecure_channel(target) as ch:
        call = stub_cls(ch).Info(pb.InfoRequest(), timeout=10)
        msg = await call
        meta = {k.removeprefix("x-hybrid-"): v for k, v in (await call.trailing_metadata())
                if k.startswith("x-hybrid-")}
        return msg, meta


def counters(target: str, role: str) -> dict[str, int]:
    """The x-hybrid-* counters of a service's Info (0 for ones not yet reported)."""
    stub = pbg.PrefillServiceStub if role == "prefill" else pbg.DecodeServiceStub
    _, meta = asyncio.run(_info(target, stub))
    return CounterDict({k: int(v) for k, v in meta.items() if v.lstrip("-").isdigit()})


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
