"""Prometheus metrics (--metrics-port): the CPU pair serves /metrics on both processes,
and after known traffic the scraped counts match it: requests by status, histogram
counts, gauges present, no slot left in use."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.api import HybridClient
from client.launch import ServicePair, free_port
from engine.errors import Unavailable
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from tests.services_util import wait_until
from transport import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_OK, MAX_NEW = 3, 5
PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        body = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def val(samples: dict, name: str, **labels: str) -> float | None:
    """The sample `name` whose labels include `labels` (summed over the others)."""
    hits = [v for (n, ls), v in samples.items()
            if n == name and set(labels.items()) <= set(ls)]
    return sum(hits) if hits else None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ports = {"prefill": free_port(), "decode": free_port()}
    logs = str(tmp_path_factory.mktemp("logs"))
    with ServicePair(model="synthetic:tiny-gpt2", device="cpu", log_dir=logs,
                     prefill_args=["--metrics-port", str(ports["prefill"])],
                     decode_args=["--metrics-port", str(ports["decode"])]) as p:
        p.metrics_ports = ports
        yield p


async def _traffic(pair: ServicePair) -> None:
    async with HybridClient(pair.prefill, pair.decode, timeout_s=60) as c:
        for transport in ("shm", "shm", "grpc")[:N_OK]:
            res = await c.generate(prompt_ids=PROMPT, max_new_tokens=MAX_NEW, ignore_eos=True,
                                   kv_transport=transport)
            assert len(res.token_ids) == MAX_NEW
        info = await c.decode_info()
    async with grpc.aio.insecure_channel(pair.prefill) as pch, \
            grpc.aio.insecure_channel(pair.decode) as dch:
        prefill, decode = pbg.PrefillServiceStub(pch), pbg.DecodeServiceStub(dch)
        # prefill refuses an empty prompt: INVALID_ARGUMENT there
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in prefill.Prefill(pb.PrefillRequest(request_id="empty"), timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a real slot, then Generate with max_new_tokens=0: INVALID_ARGUMENT on decode
        msgs = [m async for m in prefill.Prefill(pb.PrefillRequest(
            request_id="zero", prompt_ids=PROMPT, layout=info.kv_layout,
            max_new_tokens=1, kv_dtype=info.dtype), timeout=10)]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in decode.Generate(pb.GenerateRequest(
                    request_id="zero", handle=msgs[0].handle, max_new_tokens=0), timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_match_the_traffic(pair):
    pport, dport = pair.metrics_ports["prefill"], pair.metrics_ports["decode"]
    p0, d0 = scrape(pport), scrape(dport)
    assert val(p0, "hybrid_requests_total", role="prefill", status="OK") == 0
    assert val(d0, "hybrid_requests_total", role="decode", status="OK") == 0
    assert val(p0, "hybrid_requests_active", role="prefill") == 0
    assert val(d0, "hybrid_requests_queued", role="decode") == 0
    # each process exports its own role's metrics only
    assert val(d0, "hybrid_prefill_batch_size_count") is None
    assert val(p0, "hybrid_time_per_output_token_seconds_count") is None

    asyncio.run(_traffic(pair))

    def settled() -> bool:  # handlers log and observe in their finally, after the reply
        p, d = scrape(pport), scrape(dport)
        return (val(p, "hybrid_requests_total", role="prefill") == N_OK + 2
                and val(d, "hybrid_requests_total", role="decode") == N_OK + 1
                and val(p, "hybrid_prefill_slots_in_use") == 0)
    assert wait_until(settled, 10)
    p, d = scrape(pport), scrape(dport)

    # prefill: N_OK + the raw one OK, the empty prompt refused
    assert val(p, "hybrid_requests_total", role="prefill", status="OK") == N_OK + 1
    assert val(p, "hybrid_requests_total", role="prefill", status="INVALID_ARGUMENT") == 1
    assert val(p, "hybrid_time_to_first_token_seconds_count", role="prefill") == N_OK + 1
    assert val(p, "hybrid_request_duration_seconds_count", role="prefill") == N_OK + 2
    for queue in ("admission", "slot", "batch"):
        assert val(p, "hybrid_queue_wait_seconds_count", role="prefill", queue=queue) == N_OK + 1
    assert val(p, "hybrid_prefill_compute_seconds_count") == N_OK + 1
    assert val(p, "hybrid_prefill_batch_size_count") >= 1  # warm-up batches included
    assert val(p, "hybrid_prefill_kv_written_bytes_total") > 0
    assert val(p, "hybrid_prefill_slots") == 64
    assert val(p, "hybrid_prefill_region_free_bytes") > 0
    assert val(p, "hybrid_prefill_waiting_for_slot") == 0
    assert val(p, "hybrid_requests_active", role="prefill") == 0

    # decode: N_OK OK, max_new_tokens=0 refused before admission
    assert val(d, "hybrid_requests_total", role="decode", status="OK") == N_OK
    assert val(d, "hybrid_requests_total", role="decode", status="INVALID_ARGUMENT") == 1
    assert val(d, "hybrid_time_to_first_token_seconds_count", role="decode") == N_OK
    assert val(d, "hybrid_queue_wait_seconds_count", role="decode", queue="admission") == N_OK
    assert val(d, "hybrid_time_per_output_token_seconds_count") == N_OK
    assert 1 <= val(d, "hybrid_inter_token_latency_seconds_count") <= N_OK * (MAX_NEW - 1)
    assert val(d, "hybrid_decode_generated_tokens_total") == N_OK * MAX_NEW
    assert val(d, "hybrid_decode_seconds_count") == N_OK
    assert val(d, "hybrid_decode_ingest_seconds_count") == N_OK
    # the KV: the grpc request's bytes came through FetchKv, the others through shm
    grpc_bytes = val(d, "hybrid_decode_kv_ingested_bytes_total", transport="grpc")
    assert grpc_bytes > 0 and val(d, "hybrid_decode_kv_ingested_bytes_total", transport="shm") > 0
    assert val(p, "hybrid_prefill_kv_fetched_bytes_total") == grpc_bytes
    # engine figures, read at scrape time
    assert val(d, "hybrid_decode_steps_total") >= N_OK * (MAX_NEW - 1)
    assert val(d, "hybrid_decode_batch_tokens_total") >= val(d, "hybrid_decode_steps_total")
    assert val(d, "hybrid_decode_batch_rows_busy") == 0
    assert val(d, "hybrid_decode_sessions_open") == 0
    assert val(d, "hybrid_decode_kv_blocks_free") == val(d, "hybrid_decode_kv_blocks") > 0
    assert val(d, "hybrid_requests_active", role="decode") == 0
    assert val(d, "process_resident_memory_bytes") > 0


def test_metrics_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Unavailable, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.serve_metrics(port, "127.0.0.1")
        proc = subprocess.run(
            [sys.executable, "-m", "client.cli", "serve", "prefill", "--model",
             "synthetic:tiny-gpt2", "--device", "cpu", "--port", str(free_port()),
             "--metrics-port", str(port)], capture_output=True, text=True, timeout=60,
            cwd=ROOT, env=os.environ | {"PYTHONPATH": ROOT})
    assert proc.returncode == 1
    assert f"prefill: cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_is_idempotent():
    metrics.watch("prefill")
    metrics.watch("prefill", lambda: {"hybrid_requests_active": 2, "not_a_metric": 1})
    with pytest.raises(ValueError):
        metrics.watch("openai")
    srv = metrics.serve_metrics(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server_port}/metrics") as r:
            body = r.read().decode()
    finally:
        metrics.stop_metrics(srv)
    assert 'hybrid_requests_active{role="prefill"} 2.0' in body
    assert "not_a_metric" not in body
