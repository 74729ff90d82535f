"""`hybrid bench serve` without services: statistics on known inputs, strict JSON, the
seeded workload generators, the closed- and open-loop drivers against fake targets, the
failure counting of both targets, and the click group."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from bench import bench_serve as bs
from bench import serve_stats as st
from bench.serve_stats import RequestRecord, Slo
from client.cli import main
from engine import errors


def rec(ttft: float, n: int, e2e: float, status: str = "OK", gap: float | None = None,
        start: float = 10.0) -> RequestRecord:
    """A record sent at `start` whose n tokens arrive one per chunk, evenly after ttft."""
    step = (e2e - ttft) / (n - 1) if n > 1 else 0.0
    times = tuple(start + ttft + i * (step if gap is None else gap) for i in range(n))
    return RequestRecord(8, n, start, start + e2e, times if status == "OK" else (), n, status,
                         "boom" if status != "OK" else "")


# ---- statistics ---------------------------------------------------------------------

def test_distribution_percentiles_on_known_inputs():
    d = st.distribution(list(range(1, 101)))
    assert d == pytest.approx({"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert st.distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert st.distribution([7.0]) == {"mean": 7.0, "p50": 7.0, "p90": 7.0, "p99": 7.0}


def test_record_ttft_tpot_itl_e2e():
    r = RequestRecord(4, 3, 1.0, 1.5, (1.1, 1.15, 1.5), 3)
    assert r.ttft_s == pytest.approx(0.1) and r.e2e_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx((0.5 - 0.1) / 2)          # (e2e - ttft) / (n - 1)
    assert r.itl_s == pytest.approx([0.05, 0.35])                # gaps between arrivals
    one = RequestRecord(4, 1, 1.0, 1.2, (1.2,), 1)
    assert one.tpot_s is None and one.itl_s == []
    # a chunk of several ids is one arrival, counting all its tokens
    sw = st.Stopwatch(4, 3)
    sw.tokens(2)
    sw.tokens(0)   # text-only chunk: no arrival
    sw.tokens(1)
    r = sw.done()
    assert r.n_output == 3 and len(r.chunk_times) == 2 and r.ok


def test_summarize_metrics_goodput_and_status_counts():
    slo = Slo(ttft_ms=200, tpot_ms=5)
    records = [
        rec(0.100, 11, 0.140),   # TTFT 100 ms, TPOT 4 ms: good
        rec(0.300, 11, 0.340),   # TTFT 300 ms: misses TTFT
        rec(0.050, 11, 0.150),   # TPOT 10 ms: misses TPOT
        rec(0.150, 1, 0.150),    # one token: TPOT counts as 0 -> good
        rec(0, 5, 0, status="RESOURCE_EXHAUSTED"),
        rec(0, 5, 0, status="UNAVAILABLE"),
        rec(0, 5, 0, status="RESOURCE_EXHAUSTED"),
    ]
    s = st.summarize(records, duration_s=2.0, slo=slo)
    assert s["completed"] == 4 and s["failed"] == 3
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}
    assert list(s["errors"]) == ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]  # most frequent first
    assert s["error_samples"] == {"RESOURCE_EXHAUSTED": "boom", "UNAVAILABLE": "boom"}
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["total_output_tokens"] == 34 and s["output_throughput"] == pytest.approx(17.0)
    assert s["total_input_tokens"] == 32
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)   # failures are left out
    assert s["ttft_ms"]["p50"] == pytest.approx(125.0)
    assert sorted([s["tpot_ms"]["p50"]]) == pytest.approx([4.0])
    assert s["tpot_ms"]["mean"] == pytest.approx((4 + 4 + 10) / 3)
    assert s["itl_ms"]["mean"] == pytest.approx((10 * 4 + 10 * 4 + 10 * 10) / 30)
    assert s["e2e_ms"]["p99"] == pytest.approx(np.percentile([140, 340, 150, 150], 99))
    assert s["slo"] == {"ttft_ms": 200, "tpot_ms": 5} and s["short_outputs"] == 0


def test_slo_bounds_can_be_dropped():
    r = rec(0.5, 3, 1.5)   # TTFT 500 ms, TPOT 500 ms
    assert not Slo(200, None).met_by(r) and Slo(None, None).met_by(r)
    assert Slo(600, None).met_by(r) and not Slo(600, 100).met_by(r)
    assert not Slo(None, None).met_by(rec(0, 3, 0, status="ABORTED"))
    assert Slo(200, 5).describe() == "TTFT <= 200 ms and TPOT <= 5 ms"


def test_json_has_no_nan_and_round_trips():
    empty = st.summarize([rec(0, 2, 0, status="DATA_LOSS")], 0.0, Slo())
    report = {"meta": {"x": float("nan"), "y": np.float64(2.5), "z": [float("inf"), 1]},
              "points": [{"target": "pair", **bs.Point("rate", math.inf).to_json(), **empty}]}
    text = st.dumps(report)
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["meta"] == {"x": None, "y": 2.5, "z": [None, 1]}
    p = back["points"][0]
    assert p["rate"] is None and p["label"] == "rate=inf" and p["request_throughput"] is None
    assert p["ttft_ms"]["p50"] is None and p["errors"] == {"DATA_LOSS": 1}
    assert json.loads(st.dumps(back)) == back


# ---- workload -----------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_with_the_right_rate():
    a = bs.poisson_arrivals(20000, 50.0, np.random.default_rng(1))
    b = bs.poisson_arrivals(20000, 50.0, np.random.default_rng(1))
    assert np.array_equal(a, b) and a[0] == 0 and np.all(np.diff(a) >= 0)
    assert not np.array_equal(a, bs.poisson_arrivals(20000, 50.0, np.random.default_rng(2)))
    assert (len(a) - 1) / a[-1] == pytest.approx(50.0, rel=0.03)
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)   # exponential: CV 1
    bursty = np.diff(bs.poisson_arrivals(20000, 50.0, np.random.default_rng(1), burstiness=0.25))
    assert 1 / bursty.mean() == pytest.approx(50.0, rel=0.05) and bursty.std() > 1.5 * gaps.std()
    assert np.array_equal(bs.poisson_arrivals(5, math.inf, np.random.default_rng(0)), np.zeros(5))


def test_lognormal_lengths_are_seeded_and_clipped():
    def draw(seed, mean_in=64, mean_out=128, max_pos=1024):
        return bs.sample_lengths(5000, mean_in, mean_out, "lognormal", 0.5, max_pos,
                                 np.random.default_rng(seed))

    (i1, o1), (i2, o2) = draw(3), draw(3)
    assert np.array_equal(i1, i2) and np.array_equal(o1, o2)
    assert not np.array_equal(i1, draw(4)[0])
    assert i1.mean() == pytest.approx(64, rel=0.05) and o1.mean() == pytest.approx(128, rel=0.05)
    assert len(set(i1.tolist())) > 20                              # really spread
    ins, outs = draw(5, mean_in=200, mean_out=200, max_pos=256)     # much beyond the model
    assert ins.min() >= 1 and outs.min() >= 1 and ins.max() <= 255
    assert np.all(ins + outs <= 256) and (ins + outs == 256).any()
    fi, fo = bs.sample_lengths(3, 8, 9, "fixed", 0.5, 256, np.random.default_rng(0))
    assert fi.tolist() == [8, 8, 8] and fo.tolist() == [9, 9, 9]


def test_spec_stream_is_seeded_and_in_range():
    cfg = bs.ServeBenchConfig(input_len=6, output_len=4, dist="lognormal")

    def take(seed):
        stream = bs.spec_stream(cfg, 50, 32, seed)
        return [next(stream) for _ in range(100)]

    a, b = take((0, 1)), take((0, 1))
    assert a == b and a != take((0, 2))
    assert all(0 <= t < 50 for s in a for t in s.prompt_ids)
    assert all(len(s.prompt_ids) >= 1 and len(s.prompt_ids) + s.output_len <= 32 for s in a)


def test_config_points_and_checks():
    assert [p.label for p in bs.ServeBenchConfig().points()] == ["c=1", "c=4", "c=16", "c=64",
                                                                 "c=256"]
    cfg = bs.ServeBenchConfig(rates=(10.0, math.inf))
    assert [p.label for p in cfg.points()] == ["rate=10/s", "rate=inf"]
    assert bs.parse_rates("10, 50,inf") == (10.0, 50.0, math.inf)
    with pytest.raises(ValueError):
        bs.parse_ints("4,0")
    with pytest.raises(ValueError):
        bs.ServeBenchConfig(prefill_addr="a:1")
    with pytest.raises(ValueError, match="exceeds"):
        bs.check_fits(bs.ServeBenchConfig(input_len=200, output_len=100), 256)


def test_started_pair_flags_fit_the_load_and_extras_come_last():
    pfx, dec = bs.service_args(bs.ServeBenchConfig(prefill_args=("--max-slots=128",)))
    assert pfx[pfx.index("--max-queue") + 1] == "256" and pfx[-1] == "--max-slots=128"
    assert dec[dec.index("--max-batch") + 1] == "256" and dec[dec.index("--max-active") + 1] == "512"
    pfx, _ = bs.service_args(bs.ServeBenchConfig(rates=(5.0,), num_requests=1000, max_batch=8))
    assert pfx[pfx.index("--max-queue") + 1] == "1000"


# ---- drivers ------------------------------------------------------------------------

class FakeTarget:
    """Async target: counts requests in flight; each takes a few ms and streams tokens."""

    def __init__(self, delay_s: float = 0.003) -> None:
        self.now = self.peak = self.calls = 0
        self.delay_s = delay_s
        self.lanes: set[int] = set()

    async def request(self, spec: bs.RequestSpec, lane: int) -> RequestRecord:
        self.now += 1
        self.calls += 1
        self.peak = max(self.peak, self.now)
        self.lanes.add(lane)
        sw = st.Stopwatch(len(spec.prompt_ids), spec.output_len)
        try:
            for _ in range(spec.output_len):
                await asyncio.sleep(self.delay_s * (1 + (self.calls % 3)) / spec.output_len)
                sw.tokens(1)
            return sw.done()
        finally:
            self.now -= 1


def specs(n_out: int = 3):
    return bs.spec_stream(bs.ServeBenchConfig(input_len=4, output_len=n_out), 100, 64, (0,))


@pytest.mark.parametrize("clients", [1, 3, 8, 32])
def test_closed_loop_keeps_exactly_n_in_flight(clients):
    t = FakeTarget()
    m = asyncio.run(bs.run_closed(t.request, specs(), clients, requests=4 * clients,
                                  duration_s=99))
    assert t.peak == clients and m.max_in_flight == clients
    assert len(m.records) == 4 * clients == t.calls and all(r.ok for r in m.records)
    assert t.lanes == set(range(clients)) and m.duration_s > 0


def test_closed_loop_by_duration_stops_sending():
    t = FakeTarget(delay_s=0.01)
    t0 = time.perf_counter()
    m = asyncio.run(bs.run_closed(t.request, specs(), 4, requests=None, duration_s=0.2))
    assert t.peak == 4 and len(m.records) >= 8
    assert 0.2 <= time.perf_counter() - t0 < 1.0       # ends after the last in flight


def test_open_loop_sends_at_arrival_times():
    t = FakeTarget(delay_s=0.05)
    batch = [next(specs()) for _ in range(10)]
    m = asyncio.run(bs.run_open(t.request, batch, [0.0] * 10))        # rate inf: all at once
    assert len(m.records) == 10 and m.max_in_flight == 10
    t2 = FakeTarget(delay_s=0.001)
    m = asyncio.run(bs.run_open(t2.request, batch[:3], [0.0, 0.1, 0.2]))
    starts = sorted(r.start for r in m.records)
    assert starts[2] - starts[0] == pytest.approx(0.2, abs=0.05) and t2.peak == 1


def test_measure_target_rows_for_each_point():
    cfg = bs.ServeBenchConfig(concurrency=(1, 2), rates=(200.0,), requests=4, num_requests=6,
                              input_len=4, output_len=3, warmup=2)
    rows = asyncio.run(bs.measure_target("fake", FakeTarget().request, cfg, 100, 64))
    assert [(r["label"], r["completed"]) for r in rows] == [("c=1", 4), ("c=2", 4),
                                                            ("rate=200/s", 6)]
    assert [r["max_in_flight"] for r in rows[:2]] == [1, 2]
    assert rows[2]["mode"] == "rate" and rows[2]["rate"] == 200.0 and rows[2]["concurrency"] is None
    assert all(r["total_output_tokens"] == 3 * r["completed"] for r in rows)
    md = st.markdown({"meta": {"model": "m", "targets": {"fake": {"device": "CPU"}},
                               "lengths": cfg.lengths_label(), "slo": cfg.slo.describe(),
                               "config": {"warmup": 2}}, "points": rows})
    assert "| fake | c=2 | 4 | 0 |" in md and "CPU" in md and "TTFT <= 200 ms" in md


# ---- targets' failure counting ------------------------------------------------------

class FakeClient:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail

    async def stream(self, *, prompt_ids, max_new_tokens, ignore_eos):
        assert ignore_eos
        yield [1], "a"
        if self.fail is not None:
            raise self.fail
        yield [2, 3], "bc"
        yield "RemoteResult"

    async def close(self) -> None:
        pass


def test_pair_target_counts_failures_by_status_name():
    cfg = bs.ServeBenchConfig(clients_per_channel=2)
    t = bs.PairTarget("p:1", "d:2", cfg)
    rpc = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                               grpc.aio.Metadata(), details="queue full")
    t.clients = {0: FakeClient(), 1: FakeClient(errors.Unavailable("gone")), 2: FakeClient(rpc),
                 3: FakeClient(RuntimeError("bug"))}
    spec = bs.RequestSpec([1, 2], 3)

    async def go():
        return [await t.request(spec, lane) for lane in (0, 1, 2, 3, 4, 5, 6)]

    out = asyncio.run(go())
    assert [r.status for r in out] == ["OK", "OK", "UNAVAILABLE", "UNAVAILABLE",
                                       "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "UNKNOWN"]
    assert out[0].n_output == 3 and len(out[0].chunk_times) == 2
    assert out[4].error == "queue full" and "bug" in out[6].error
    assert st.status_counts(out) == {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 2, "UNKNOWN": 1}


class FakeEngine:
    """LLMEngine's interface: submit() -> blocking iterator of ids with cancel()."""

    def __init__(self, lm=None, max_batch: int = 1) -> None:
        self.max_batch, self.threads, self.closed = max_batch, set(), False

    def submit(self, prompt_ids, max_new_tokens, params=None, ignore_eos=False):
        assert ignore_eos and params is not None
        if len(prompt_ids) == 0:
            raise errors.InvalidArgument("empty")
        self.threads.add(threading.get_ident())
        return FakeRequest(max_new_tokens, fail=prompt_ids[0] == 99)

    def close(self) -> None:
        self.closed = True


class FakeRequest:
    def __init__(self, n: int, fail: bool) -> None:
        self.n, self.fail = n, fail

        self.cancelled = False

    def __iter__(self):
        for i in range(self.n):
            time.sleep(0.002)
            if self.cancelled:
                return
            if self.fail and i == 1:
                raise errors.ResourceExhausted("no rows")
            yield i

    def cancel(self) -> None:
        self.cancelled = True


def test_local_target_runs_on_threads_and_counts_failures():
    eng = FakeEngine()
    t = bs.LocalTarget(eng, workers=4)

    async def go():
        return await asyncio.gather(*(t.request(bs.RequestSpec(ids, 5), 0)
                                      for ids in ([1], [2], [99], [3], [])))

    out = asyncio.run(go())
    t.close()
    assert [r.status for r in out] == ["OK", "OK", "RESOURCE_EXHAUSTED", "OK", "INVALID_ARGUMENT"]
    assert out[0].n_output == 5 and len(out[0].chunk_times) == 5 and out[0].tpot_s > 0
    assert threading.get_ident() not in eng.threads


# ---- the command line ---------------------------------------------------------------

def test_bench_group_lists_serve_and_serve_help_works():
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0 and "serve" in r.output and "--points" in r.output
    r = CliRunner().invoke(main, ["bench", "serve", "--help"])
    assert r.exit_code == 0, r.output
    for opt in ("--target", "--concurrency", "--rate", "--dist", "--slo-ttft-ms", "--json",
                "--png", "--prefill", "--decode"):
        assert opt in r.output
    r = CliRunner().invoke(main, ["bench", "serve", "--concurrency", "0"])
    assert r.exit_code == 2 and "--concurrency" in r.output
    r = CliRunner().invoke(main, ["bench", "serve", "--prefill", "x:1"])
    assert r.exit_code == 2 and "--decode" in r.output


def test_serve_local_end_to_end_with_a_fake_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "_new_engine", lambda lm, max_batch: FakeEngine(lm, max_batch))
    paths = {k: tmp_path / f"out.{k}" for k in ("json", "md", "png")}
    r = CliRunner().invoke(main, [
        "bench", "serve", "--target", "local", "--model", "synthetic:tiny-gpt2", "--device",
        "cpu", "--concurrency", "1,2", "--requests", "4", "--rate", "inf", "--num-requests", "3",
        "--input-len", "8", "--output-len", "4", "--warmup", "1",
        *[a for k, p in paths.items() for a in (f"--{k}", str(p))]])
    assert r.exit_code == 0, r.output
    assert "| local | c=2 | 4 | 0 |" in r.output and "synthetic:tiny-gpt2" in r.output
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"meta", "points"}
    assert data["meta"]["targets"]["local"]["device"] == "CPU"
    assert [p["label"] for p in data["points"]] == ["c=1", "c=2", "rate=inf"]
    assert data["points"][2]["rate"] is None and data["points"][2]["completed"] == 3
    assert paths["md"].read_text().startswith("hybrid bench serve:")
    assert paths["png"].exists() or "matplotlib is not installed" in r.output


def test_local_target_close_cancels_requests_in_flight():
    t = bs.LocalTarget(FakeEngine(), workers=2)

    async def go():
        task = asyncio.create_task(t.request(bs.RequestSpec([1], 10_000), 0))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, t.close)   # e.g. Ctrl-C
        return await task

    r = asyncio.run(go())
    assert r.ok and 0 < r.n_output < 10_000 and r.n_output < r.output_len
