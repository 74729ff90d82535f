"""Placement reproduces the source's conclusions from the source's stage times."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from client.cmd_plan import plan as plan_cmd
from engine.errors import InvalidArgument
from fpga_service.placement import StageModel, plan


@pytest.mark.parametrize("n_in,n_out", [(256, 256), (256, 512), (512, 256), (512, 512)])
def test_hybrid_wins_for_256_and_above(n_in, n_out):
    p = plan(n_in, n_out)
    assert p.choice == "hybrid"
    assert p.eq4_hybrid_beats_gpu and p.eq5_hybrid_beats_fpga


@pytest.mark.parametrize("n_in", [256, 512])
def test_gpu_only_for_short_outputs(n_in):
    p = plan(n_in, 16)
    assert p.choice == "gpu-only"
    assert not p.eq4_hybrid_beats_gpu


def test_equations_agree_with_totals():
    for n_in in (16, 64, 128, 256, 700):
        for n_out in (1, 8, 64, 100, 256, 1000):
            p = plan(n_in, n_out)
            lat = p.latency_ms
            assert p.eq4_hybrid_beats_gpu == (lat["hybrid"] < lat["gpu-only"])
            assert p.eq5_hybrid_beats_fpga == (lat["hybrid"] < lat["fpga-only"])
            assert lat[p.choice] == min(lat.values())


def test_interpolates_source_points():
    m = StageModel()
    assert m.prefill_ms("gpu", 256) == pytest.approx(10.3)
    assert m.prefill_ms("gpu", 384) == pytest.approx((10.3 + 15.3) / 2)
    assert m.prefill_ms("fpga", 64) == pytest.approx(156.0)


def test_measured_times_change_the_choice():
    # A transfer that costs more than the whole decode advantage makes hybrid lose.
    p = plan(512, 512, StageModel(transfer_ms=10_000.0))
    assert p.choice != "hybrid"


def test_bad_input():
    with pytest.raises(InvalidArgument):
        plan(0, 5)
    with pytest.raises(InvalidArgument):
        StageModel(gpu_prefill=((64, 1.0), (64, 2.0)))


def test_cli_prints_three_latencies_and_choice():
    out = CliRunner().invoke(plan_cmd, ["--input", "256", "--output", "256"])
    assert out.exit_code == 0, out.output
    for name in ("gpu-only", "fpga-only", "hybrid"):
        assert name in out.output
    assert "choice: hybrid" in out.output
    out = CliRunner().invoke(plan_cmd, ["--input", "512", "--output", "8"])
    assert "choice: gpu-only" in out.output
    out = CliRunner().invoke(plan_cmd, ["--input", "64", "--output", "8", "--gpu-prefill", "x"])
    assert out.exit_code != 0


# The source's measured end-to-end latencies (ms): gpu-only, fpga-only, hybrid.
SOURCE_TABLE = {
    (64, 64): (369.00, 371.99, 436.68), (64, 256): (1257.60, 755.44, 1079.12),
    (64, 512): (2574.02, 1872.02, 1905.14), (256, 64): (322.42, 833.00, 395.71),
    (256, 256): (1292.48, 1484.21, 1087.51), (256, 512): (2699.78, 2359.70, 1934.68),
    (512, 64): (339.09, 1469.47, 416.06), (512, 256): (1336.04, 2132.07, 1096.35),
    (512, 512): (2708.12, 3029.38, 1992.02),
}


@pytest.mark.parametrize("shape", sorted(SOURCE_TABLE))
def test_stage_model_picks_the_measured_winner(shape):
    measured = dict(zip(("gpu-only", "fpga-only", "hybrid"), SOURCE_TABLE[shape], strict=True))
    assert plan(*shape).choice == min(measured, key=measured.get)


def test_stage_model_latencies_near_the_source_table():
    # Stage sums cannot match every cell (the source's FPGA decode was faster at short
    # contexts: 64:256 FPGA-only measured 755 ms vs 156 + 255 * 3.4): bound the average.
    errs = [abs(plan(*shape).latency_ms[name] - ms) / ms
            for shape, row in SOURCE_TABLE.items()
            for name, ms in zip(("gpu-only", "fpga-only", "hybrid"), row, strict=True)]
    assert sum(errs) / len(errs) < 0.06  # 3.6% with the defaults


def test_fpga_decode_from_the_derived_cycle_model():
    """--fpga-model takes FPGA decode from the hbm_decode cycle model (docs/fpga-kernel.md)
    and prints the source's measured 3.4 ms/token next to it; without it the plan uses
    the source's figure and still shows the derived one."""
    from fpga_service.device.bandwidth import SOURCE_MS_PER_TOKEN
    from fpga_service.placement import SOURCE_FPGA_DECODE_MS, modeled_fpga_decode_ms

    assert SOURCE_FPGA_DECODE_MS == SOURCE_MS_PER_TOKEN == 3.4
    derived = modeled_fpga_decode_ms("gpt2-medium", 256, 256)   # context 256 + 127
    assert 9.88 < derived < 13.21   # between the doc's 256- and 512-token rows
    out = CliRunner().invoke(plan_cmd, ["--input", "256", "--output", "256",
                                        "--fpga-model", "gpt2-medium"])
    assert out.exit_code == 0, out.output
    assert (f"derived hbm_decode cycle model of gpt2-medium (300 MHz): {derived:.3f} ms/token"
            in out.output)
    assert "source (DFX on a U55C, gpt2-medium, measured): 3.4 ms/token" in out.output
    # the kernel as written decodes slower than the GPU's 5 ms/token: GPU-only wins
    assert "choice: gpu-only" in out.output
    slow = CliRunner().invoke(plan_cmd, ["--input", "256", "--output", "256",
                                         "--fpga-model", "gpt2-medium", "--fpga-clock-mhz", "200"])
    assert f"(200 MHz): {modeled_fpga_decode_ms('gpt2-medium', 256, 256, clock_mhz=200):.3f}" in slow.output
    # defaults: the source's figure decides, the derived one is shown
    out = CliRunner().invoke(plan_cmd, ["--input", "256", "--output", "256"])
    assert out.exit_code == 0, out.output
    assert "FPGA decode: source (DFX on a U55C, gpt2-medium, measured): 3.4 ms/token" in out.output
    assert f"cycle model of gpt2-medium (300 MHz): {derived:.3f} ms/token" in out.output
    assert "choice: hybrid" in out.output
    out = CliRunner().invoke(plan_cmd, ["--input", "256", "--output", "256",
                                        "--fpga-model", "llama-7b"])
    assert "choice: gpu-only" in out.output
    out = CliRunner().invoke(plan_cmd, ["--input", "8", "--output", "8", "--fpga-model", "nope"])
    assert out.exit_code != 0 and "unknown preset" in out.output
    out = CliRunner().invoke(plan_cmd, ["--input", "8", "--output", "8", "--fpga-model",
                                        "gpt2-medium", "--fpga-clock-mhz", "0"])
    assert out.exit_code != 0 and "clock must be positive" in out.output


def _sweep(gpu_decode: float, ttft_extra: float) -> dict:
    rows = []
    for n_in, prefill in ((64, 8.0), (512, 12.0)):
        rows.append({"path": "local", "n_in": n_in, "n_out": 64, "prefill_ms": prefill,
                     "decode_ms_per_token": gpu_decode, "ttft_ms": prefill})
        rows.append({"path": "pair", "n_in": n_in, "n_out": 64, "prefill_ms": prefill + 9,
                     "decode_ms_per_token": gpu_decode, "ttft_ms": prefill + ttft_extra})
    return {"rows": rows}


def test_measured_sweep_drives_the_plan(tmp_path):
    """`hybrid plan --measured` takes the engine's prefill/decode and the pair's extra TTFT
    from a bench sweep; a fast GPU decode flips the choice to GPU-only (eq. 4 fails)."""
    import json

    from client.cli import main
    from fpga_service.placement import measured_from_sweep

    m = measured_from_sweep(_sweep(1.5, 20.0))
    assert m.gpu_prefill == ((64.0, 8.0), (512.0, 12.0))
    assert m.gpu_decode_ms == 1.5 and m.transfer_ms == 20.0
    path = tmp_path / "sweep.json"
    for decode, choice in ((1.5, "gpu-only"), (5.0, "hybrid")):
        path.write_text(json.dumps(_sweep(decode, 20.0)))
        out = CliRunner().invoke(main, ["plan", "--input", "512", "--output", "512",
                                        "--measured", str(path), "--fpga-decode-ms", "3.4"])
        assert out.exit_code == 0, out.output
        assert out.output.strip().endswith(f"choice: {choice}"), out.output


def test_measured_sweep_needs_both_paths():
    from fpga_service.placement import measured_from_sweep

    rows = [r for r in _sweep(1.5, 20.0)["rows"] if r["path"] == "local"]
    with pytest.raises(InvalidArgument, match="'local' and 'pair'"):
        measured_from_sweep({"rows": rows})
