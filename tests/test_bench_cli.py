"""`hybrid bench` end to end on the CPU with a tiny model: every requested path gets a
row per point, the reports are written, bad options are refused."""

import json

from click.testing import CliRunner

from client.cli import main


def test_bench_writes_rows_for_each_path(tmp_path):
    out = tmp_path / "res"
    res = CliRunner().invoke(main, [
        "bench", "--model", "synthetic:tiny-gpt2", "--device", "cpu", "--points", "4:3,6:2",
        "--reps", "1", "--paths", "local,hf-eager,pair,fpga-proj", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sweep.json").read_text(), parse_constant=_not_json)  # no NaN
    got = sorted((r["path"], r["n_in"], r["n_out"]) for r in data["rows"])
    want = sorted((p, n_in, n_out) for p in ("local", "hf-eager", "pair", "fpga-proj")
                  for n_in, n_out in ((4, 3), (6, 2)))
    assert got == want
    rows = {(r["path"], r["n_in"]): r for r in data["rows"]}
    assert all(r["total_ms"] > 0 for r in data["rows"])
    pair, proj = rows[("pair", 4)], rows[("fpga-proj", 4)]
    assert proj["label"] == "projected" and proj["ttft_ms"] == pair["ttft_ms"]
    assert proj["total_ms"] > proj["ttft_ms"]  # + modeled decode of 2 steps
    assert pair["kv_bytes"] > 0 and isinstance(pair["kv_bytes"], int)
    assert data["meta"]["roofline_ms_per_token"] is None  # CPU: no bandwidth measured
    # fpga-proj decode: the derived hbm_decode cycle model, step by step (contexts 5, 6)
    from engine.config import preset
    from fpga_service.device.bandwidth import CycleModel
    from kernels.hbm_layout import HbmLayout

    cfg = preset("tiny-gpt2")
    lay = HbmLayout.for_model(cfg, "float16")
    want = sum(CycleModel().step_ms(cfg, lay, n)[0] for n in (5, 6))
    assert abs(proj["total_ms"] - proj["ttft_ms"] - want) < 1e-6
    fm = data["meta"]["fpga_model"]
    assert fm["source_ms_per_token"] == 3.4 and fm["clock_mhz"] == 300
    assert fm["model"].startswith("derived cycle model of hbm_decode")
    md = (out / "sweep.md").read_text()
    assert "| 4:3 | fpga-proj (projected) |" in md and "vs hf-eager" in md
    assert "fpga-proj decode: derived cycle model of hbm_decode (" in md
    assert "source (DFX on a U55C, gpt2-medium, measured): 3.4 ms/token" in md
    assert "roofline n/a" in md and "nan" not in md.lower()
    assert "nan" not in res.output.lower()


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def test_bench_refuses_bad_options(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--points", "64x64", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "IN:OUT" in r.output
    r = CliRunner().invoke(main, ["bench", "--paths", "local,warp", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "warp" in r.output
