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
