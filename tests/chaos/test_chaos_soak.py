"""Chaos suite, soak (issue 13: "10,000 requests leave slots, fds and RSS flat"): the CI
version, 2,000 requests after a warm-up batch; `python -m bench.soak` runs 10,000+ and
prints the figures. Real processes on loopback, synthetic tiny GPT-2 on the CPU, one
request in ten taking its KV through FetchKv instead of shared memory."""

from __future__ import annotations

import asyncio

import pytest

from client.launch import ServicePair
from tests.chaos.chaos_util import MODEL, counters, fd_count, run_load, settled_rss_mb, wait_for

REQUESTS = 2_000
WARMUP = 200
CONCURRENCY = 8
# Tolerances after the warm-up batch (measured here: RSS within 1 MB, fds within 2):
RSS_TOLERANCE = 0.05   # +5% of each service's RSS
FD_SLACK = 4           # open fds: gRPC may keep a connection or two more or less


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with ServicePair(model=MODEL, device="cpu", log_dir=str(logs),
                     prefill_args=["--lease-s", "20"]) as p:
        yield p


def _figures(pair) -> dict[str, tuple[float, int]]:
    return {role: (settled_rss_mb(p.pid), fd_count(p.pid)) for role, p in pair.procs.items()}


def test_many_requests_leave_slots_fds_and_rss_flat(pair):
    warm = asyncio.run(run_load(pair.prefill, pair.decode, WARMUP, CONCURRENCY, grpc_every=10))
    assert warm.by_status == {"OK": WARMUP}
    assert wait_for(lambda: counters(pair.prefill, "prefill")["slots-in-use"] == 0, 2) is not None
    before = _figures(pair)
    p0, d0 = counters(pair.prefill, "prefill"), counters(pair.decode, "decode")

    res = asyncio.run(run_load(pair.prefill, pair.decode, REQUESTS, CONCURRENCY, grpc_every=10))
    assert res.by_status == {"OK": REQUESTS}
    assert res.max_overrun_s < 0  # none ran past its deadline

    # every slot released by the decoder that read it: none reaped, failed or left held
    assert wait_for(lambda: counters(pair.prefill, "prefill")["slots-in-use"] == 0, 2) is not None
    p, d = counters(pair.prefill, "prefill"), counters(pair.decode, "decode")
    assert p["slots-allocated"] - p0["slots-allocated"] == REQUESTS
    assert p["slots-released"] - p0["slots-released"] == REQUESTS
    assert (p["slots-reaped"], p["slots-failed"]) == (p0["slots-reaped"], p0["slots-failed"])
    assert (p["clients-holding"], p["active"], p["waiting"]) == (0, 0, 0)
    assert (d["sessions-open"], d["active"], d["cancelled"]) == (0, 0, d0["cancelled"])
    assert d["grpc-requests"] - d0["grpc-requests"] == REQUESTS // 10

    after = _figures(pair)
    for role in before:
        (rss0, fds0), (rss1, fds1) = before[role], after[role]
        assert rss1 <= rss0 * (1 + RSS_TOLERANCE), f"{role} RSS {rss0:.0f} -> {rss1:.0f} MB"
        assert abs(fds1 - fds0) <= FD_SLACK, f"{role} open fds {fds0} -> {fds1}"
    print(f"soak {REQUESTS} requests at {CONCURRENCY}: {res.wall_s:.1f} s, p50 "
          f"{res.percentile(50):.0f} ms, p99 {res.percentile(99):.0f} ms; RSS/fds "
          + ", ".join(f"{r} {before[r][0]:.0f}->{after[r][0]:.0f} MB {before[r][1]}->{after[r][1]}"
                      for r in before))
