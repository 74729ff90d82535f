"""bench/bench_two_gpu.py without GPUs: the plan of each configuration (devices, pairing,
the host path forced for split-host), the kv_device plumbing into the client's stream
call and `hybrid bench serve --no-kv-device`, goodput against the stated SLO, the
best-configuration summary and the reports, on made-up records."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from click.testing import CliRunner

from bench import bench_serve as bs
from bench import bench_two_gpu as b2
from bench import serve_stats as st
from bench.serve_stats import RequestRecord, Slo
from client.cli import main as hybrid


def plans(*names: str) -> dict[str, b2.ConfigPlan]:
    ports = itertools.count(50000)
    return {n: b2.plan_config(n, ports) for n in names or b2.CONFIGS}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---- the plan -----------------------------------------------------------------------

def test_each_configuration_puts_its_services_on_the_right_gpus():
    ps = plans()
    dev = {n: [(s.role, s.device) for s in p.services] for n, p in ps.items()}
    assert dev["one-gpu"] == [("prefill", "cuda:0"), ("decode", "cuda:0")]
    assert dev["split-host"] == [("prefill", "cuda:0"), ("decode", "cuda:1")]
    assert dev["split-ipc"] == [("prefill", "cuda:0"), ("decode", "cuda:1")]
    assert dev["two-engines"] == [("prefill", "cuda:0"), ("decode", "cuda:0"),
                                  ("prefill", "cuda:1"), ("decode", "cuda:1")]
    # only split-host keeps the client off the GPU KV path
    assert {n: p.kv_device for n, p in ps.items()} == {
        "one-gpu": True, "split-host": False, "split-ipc": True, "two-engines": True}
    assert {n: p.gpus_needed for n, p in ps.items()} == {
        "one-gpu": 1, "split-host": 2, "split-ipc": 2, "two-engines": 2}
    ports = [s.port for p in ps.values() for s in p.services]
    assert len(ports) == len(set(ports))  # every service of the run its own port


def test_service_commands_devices_pairing_and_flags():
    opts = b2.Options(prefill_args=("--max-slots=512",), decode_args=("--max-active=64",))
    ps = plans()
    for plan in ps.values():
        cmds = opts.commands(plan)
        assert [s for s, _ in cmds] == list(plan.services)
        for svc, argv in cmds:
            assert argv[:2] == ["serve", svc.role]
            assert flag(argv, "--device") == svc.device
            assert flag(argv, "--port") == str(svc.port)
            assert flag(argv, "--model") == "synthetic:gpt2-medium"
            assert flag(argv, "--dtype") == "float16"
            assert int(flag(argv, "--max-queue")) >= 128  # the biggest level queues, never refused
            if svc.role == "prefill":
                assert flag(argv, "--region-mb") == "4096"
                assert flag(argv, "--max-slots") == "256" and argv[-1] == "--max-slots=512"
                assert "--prefill" not in argv
            else:
                assert flag(argv, "--backend") == "gpu" and flag(argv, "--max-batch") == "256"
                assert argv[-1] == "--max-active=64"  # the user's flags come last
    # every decode attaches to the prefill of its own pair, on its own GPU in two-engines
    for plan in ps.values():
        for p, d in plan.pairs:
            assert flag(dict(opts.commands(plan))[d], "--prefill") == p.address
    two = ps["two-engines"]
    assert len(two.role("prefill")) == 2 and len(two.role("decode")) == 2
    assert {s.device for s in two.role("prefill")} == {"cuda:0", "cuda:1"}
    assert {s.device for s in two.role("decode")} == {"cuda:0", "cuda:1"}
    assert all(p.device == d.device for p, d in two.pairs)
    assert two.prefill_addr.count(",") == 1 and two.decode_addr.count(",") == 1
    split = ps["split-host"]
    assert (split.prefill_addr, split.decode_addr) == (
        split.services[0].address, split.services[1].address)


def test_split_host_sends_kv_device_false_to_the_client_stream():
    ps = plans("split-host", "split-ipc")
    seen = {}

    class Client:
        async def stream(self, **kw):
            seen.setdefault(name, kw)
            yield [1, 2], "ab"
            yield type("R", (), {"kv_path": "shm" if not kw.get("kv_device", True) else "cuda-ipc",
                                 "prefill_address": "p", "decode_address": "d"})()

    for name, plan in ps.items():
        cfg = b2.Options().serve_config(plan)
        assert cfg.kv_device is plan.kv_device
        assert (cfg.prefill_addr, cfg.decode_addr) == (plan.prefill_addr, plan.decode_addr)
        t = b2.RoutedTarget(plan.prefill_addr, plan.decode_addr, cfg)
        t.clients = {0: Client()}
        rec = asyncio.run(t.request(bs.RequestSpec([5, 6, 7], 2), 0))
        assert rec.ok and rec.n_output == 2
        assert t.take_tallies() == ({"p > d": 1}, {"shm" if name == "split-host" else "cuda-ipc": 1})
        assert t.take_tallies() == ({}, {})
    assert seen["split-host"]["kv_device"] is False
    assert "kv_device" not in seen["split-ipc"]  # the client's default (GPU path allowed)
    assert seen["split-host"]["ignore_eos"] is True


def test_hybrid_bench_serve_no_kv_device_reaches_the_config(monkeypatch):
    got = []

    def fake_run(cfg):
        got.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bs, "run", fake_run)
    r = CliRunner().invoke(hybrid, ["bench", "serve", "--prefill", "a:1", "--decode", "b:2",
                                    "--no-kv-device"])
    assert r.exit_code == 1 and "stop here" in r.output
    r = CliRunner().invoke(hybrid, ["bench", "serve", "--prefill", "a:1", "--decode", "b:2"])
    assert [c.kv_device for c in got] == [False, True]
    assert "--no-kv-device" in CliRunner().invoke(hybrid, ["bench", "serve", "--help"]).output


# ---- options, budget, dry run -------------------------------------------------------

def test_parsing_and_the_time_budget_of_the_defaults():
    assert b2.parse_mixes("64:128, 512:128") == ((64, 128), (512, 128))
    assert b2.parse_configs("two-engines,one-gpu") == ("two-engines", "one-gpu")
    for bad in ("64x128", "0:5", ""):
        with pytest.raises(ValueError):
            b2.parse_mixes(bad)
    with pytest.raises(ValueError, match="known"):
        b2.parse_configs("one-gpu,three-gpu")
    opts, _ = b2.parse_args([])
    assert opts.configs == b2.CONFIGS and opts.mixes == ((64, 128), (512, 128))
    assert opts.concurrency == (1, 8, 32, 128) and opts.duration_s == 10.0
    assert (opts.slo.ttft_ms, opts.slo.tpot_ms) == (200.0, 20.0)
    budget = opts.budget()
    assert budget["points"] == 32 and budget["measured_s"] == 320.0
    assert 320 < budget["total_s"] <= 8.5 * 60  # the defaults fit the ~8 minutes
    one, _ = b2.parse_args(["--configs", "one-gpu", "--concurrency", "1,8"])
    assert one.budget()["total_s"] < budget["total_s"] / 4
    assert "over ~8 min" in b2.budget_line(b2.Options(duration_s=60))


def test_dry_run_prints_commands_points_slo_and_budget(capsys):
    assert b2.main(["--dry-run", "--configs", "split-host,two-engines",
                    "--slo-tpot-ms", "25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: ")
    assert "TTFT <= 200 ms and TPOT <= 25 ms" in out and "planned time:" in out
    assert "split-host:" in out and "kv_device=False" in out and "one-gpu:" not in out
    assert out.count("serve prefill") == 3 and out.count("serve decode") == 3
    assert out.count("--device cuda:1") == 3  # split-host's decode, pair 1's two services
    assert "512:128 c=128" in out
    with pytest.raises(SystemExit):
        b2.parse_args(["--configs", "nope"])


# ---- goodput and the summary --------------------------------------------------------

def rec(ttft_s: float, tpot_s: float, n: int = 11, status: str = "OK") -> RequestRecord:
    times = tuple(ttft_s + i * tpot_s for i in range(n)) if status == "OK" else ()
    return RequestRecord(64, n, 0.0, ttft_s + (n - 1) * tpot_s, times, n, status)


def test_goodput_counts_requests_meeting_both_slos():
    slo = b2.Options().slo
    records = [rec(0.100, 0.010),               # good
               rec(0.199, 0.0199),              # good: both just inside
               rec(0.250, 0.010),               # TTFT missed
               rec(0.100, 0.025),               # TPOT missed
               rec(0.0, 0.0, status="UNAVAILABLE")]
    s = st.summarize(records, duration_s=2.0, slo=slo)
    assert s["completed"] == 4 and s["good_requests"] == 2
    assert s["goodput"] == pytest.approx(1.0) and s["request_throughput"] == pytest.approx(2.0)
    loose = st.summarize(records, 2.0, Slo(300.0, 30.0))
    assert loose["good_requests"] == 4


def row(config: str, mix: str, conc: int, goodput: float | None, **kw) -> dict:
    d = st.distribution([10.0, 20.0])
    return {"config": config, "mix": mix, "mode": "concurrency", "concurrency": conc,
            "completed": 10, "failed": 0, "errors": {}, "request_throughput": 5.0,
            "output_throughput": 640.0, "ttft_ms": d, "tpot_ms": d, "goodput": goodput,
            "good_requests": 4, "kv_paths": {"shm": 10}, "routes": {}, **kw}


def test_best_configuration_per_mix_and_concurrency():
    rows = [row("one-gpu", "64:128", 1, 6.0), row("split-host", "64:128", 1, 5.5),
            row("split-ipc", "64:128", 1, 6.5), row("two-engines", "64:128", 1, 6.2),
            row("two-engines", "64:128", 8, 40.0), row("one-gpu", "64:128", 8, 30.0),
            row("split-ipc", "64:128", 8, 40.0),
            row("one-gpu", "512:128", 1, 0.0), row("split-ipc", "512:128", 1, None),
            row("one-gpu", "512:128", 32, 3.0), row("split-host", "512:128", 32, 9.0)]
    best = b2.best_goodput(rows)
    assert [(b["mix"], b["concurrency"], b["best"]) for b in best] == [
        ("64:128", 1, ["split-ipc"]),
        ("64:128", 8, ["split-ipc", "two-engines"]),  # a tie: both, in config order
        ("512:128", 1, []),                                          # nobody met the SLO
        ("512:128", 32, ["split-host"])]
    assert best[0]["goodput"] == 6.5
    assert list(best[0]["by_config"]) == list(b2.CONFIGS)           # configuration order
    assert best[2]["by_config"] == {"one-gpu": 0.0, "split-ipc": 0.0}
    lines = "\n".join(b2.best_lines(best))
    assert "- c=1: **split-ipc** 6.50 req/s" in lines
    assert "**split-ipc** = **two-engines** 40.00" in lines and "none met the SLO" in lines


def test_markdown_and_json_reports(tmp_path):
    opts = b2.Options()
    rows = [row("split-ipc", "512:128", 8, 7.0, kv_paths={"cuda-ipc": 10}),
            row("one-gpu", "512:128", 8, 8.0), row("one-gpu", "64:128", 8, 9.0)]
    ps = plans()
    report = {"meta": {
        "device": {"cuda": True, "count": 2, "names": ["NVIDIA H200"] * 2,
                   "peer": {"0->1": True, "1->0": True}},
        "model": opts.model, "dtype": opts.dtype, "mixes": ["64:128", "512:128"],
        "concurrency": [8], "duration_s": 10.0, "warmup": 8,
        "slo": {"ttft_ms": 200.0, "tpot_ms": 20.0},
        "configs": [{"name": n, "about": p.about} for n, p in ps.items()],
        "warnings": ["split-ipc: something"], "failures": [{"config": "two-engines",
                                                           "error": "RuntimeError: x"}]},
        "points": rows, "best": b2.best_goodput(rows)}
    md = b2.markdown(report)
    assert "device: 2 GPU(s): NVIDIA H200 x 2; peer access 0->1 yes, 1->0 yes" in md
    assert "TTFT <= 200 ms and TPOT <= 20 ms" in md and "DistServe" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [ln.split(" | ")[0:3] for ln in table] == [  # mix, then clients, then config
        ["| one-gpu", "64:128", "8"], ["| one-gpu", "512:128", "8"], ["| split-ipc", "512:128", "8"]]
    assert "| 7.00 | 40 | cuda-ipc 10 | - |" in table[2]
    assert "**warning**: split-ipc: something" in md and "**failed**: `two-engines`" in md
    assert "mix 512:128:\n- c=8: **one-gpu** 8.00 req/s (one-gpu 8.00, split-ipc 7.00)" in md
    msgs = b2.write(report, tmp_path / "r.json", tmp_path / "r.md")
    assert len(msgs) == 2 and (tmp_path / "r.md").read_text() == md
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["best"][1]["best"] == ["one-gpu"]
    assert b2.describe_device({"cuda": False, "count": 0}).startswith("device: no CUDA")


def test_warnings_when_a_configuration_did_not_measure_what_it_says():
    unmapped = {"pairs": [{"ipc_mapped": False}]}
    assert "did not map" in b2.config_warnings("split-ipc", unmapped, [])[0]
    assert b2.config_warnings("split-ipc", {"pairs": [{"ipc_mapped": True}]},
                              [row("split-ipc", "64:128", 1, 1.0, kv_paths={"cuda-ipc": 3})]) == []
    w = b2.config_warnings("split-ipc", {"pairs": [{"ipc_mapped": True}]},
                           [row("split-ipc", "64:128", 1, 1.0, kv_paths={"shm": 3})])
    assert w and "no request took the cuda-ipc path" in w[0]
    w = b2.config_warnings("split-host", None, [row("split-host", "64:128", 1, 1.0,
                                                    kv_paths={"cuda-ipc": 2, "shm": 1})])
    assert w == ["split-host: 2 requests took the cuda-ipc path"]
    one = b2.config_warnings("two-engines", None,
                             [row("two-engines", "64:128", 1, 1.0, routes={"p0 > d0": 5})])
    assert one and "one pair only" in one[0]
    assert b2.config_warnings("two-engines", None, [row(
        "two-engines", "64:128", 8, 1.0, routes={"p0 > d0": 5, "p1 > d1": 4})]) == []
