"""The derived cycle model of the hbm_decode kernel (fpga_service/device/bandwidth.py)
equals the derivation in docs/fpga-kernel.md: this test parses the page's gpt2-medium
tables, so the two cannot drift apart; and the model behaves like the kernel's
structure says (context, clock, element type, model dims)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import preset
from fpga_service.device.bandwidth import (
    SOURCE_MS_PER_TOKEN,
    BandwidthModel,
    CycleModel,
)
from kernels.hbm_layout import HbmLayout

DOC = Path(__file__).resolve().parent.parent / "docs" / "fpga-kernel.md"


def _num(text: str) -> float:
    return float(text.replace("*", "").replace(" ", "").replace("M", ""))


def _section() -> str:
    s = DOC.read_text()
    return s[s.index("## Cycle count per decode step"):s.index("## Resources against")]


@pytest.fixture(scope="module")
def medium():
    cfg = preset("gpt2-medium")
    return cfg, HbmLayout.for_model(cfg, "float16"), CycleModel()


def test_per_layer_terms_match_the_doc(medium):
    cfg, lay, m = medium
    terms = {r[0].strip(): r[1].strip() for r in
             re.findall(r"^\| ([^|]+) \| ([\d ]+) \|", _section(), re.M)}
    fixed = m.layer_fixed(cfg, lay)
    names = {"weight streaming": "weights", "x load before each matvec": "x_load",
             "matvec latency": "mv_latency", "matvec gather tail": "mv_gather",
             "two norms": "norms", "residuals, GELU": "residual_act", "kv append": "kv_append"}
    for row, key in names.items():
        assert _num(terms[row]) == round(fixed[key]), row
    assert _num(terms["fixed per layer"]) == round(sum(fixed.values()))
    assert m.words_per_cycle == pytest.approx(0.749, abs=5e-4)


def test_context_table_matches_the_doc(medium):
    cfg, lay, m = medium
    rows = re.findall(r"^\| (\d+) \| ([\d ]+) \| ([\d ]+) \| ([\d.]+ M) \| \*\*([\d.]+)\*\* \|$",
                      _section(), re.M)
    assert [int(r[0]) for r in rows] == [64, 256, 512]
    for ctx, att, layer, step, ms in rows:
        lc, sc = m.layer_cycles(cfg, lay, int(ctx)), m.step_cycles(cfg, lay, int(ctx))
        assert _num(att) == round(lc["attention"]), ctx
        assert _num(layer) == round(lc["total"]), ctx
        assert _num(step) == round(sc["total"] / 1e6, 2), ctx
        assert float(ms) == round(m.step_ms(cfg, lay, int(ctx))[0], 2), ctx
        # the attention formula stated in the terms table
        nb = -(-int(ctx) // 32)
        assert lc["attention"] == 2248 + 1120 * nb + 128 * int(ctx)
    bound = re.search(r"^\| streaming bound .*\| ([\d.]+) / ([\d.]+) / ([\d.]+) \|$", _section(), re.M)
    assert [float(x) for x in bound.groups()] == [
        round(m.cycles_to_ms(m.streaming_cycles(cfg, lay, n)), 2) for n in (64, 256, 512)]
    src = re.search(r"^\| source .*\| \*\*([\d.]+)\*\* \|$", _section(), re.M)
    assert float(src.group(1)) == SOURCE_MS_PER_TOKEN == 3.4
    fixed = re.search(r"besides the 24 layers, ([\d ]+) cycles", _section())
    sc = m.step_cycles(cfg, lay, 64)
    assert _num(fixed.group(1)) == round(sc["total"] - sc["layers"])


def test_other_settings_line_matches_the_doc(medium):
    cfg, lay, _ = medium
    s = _section()
    got = {
        "250 MHz": CycleModel(clock_mhz=250).step_ms(cfg, lay, 256)[0],
        "200 MHz": CycleModel(clock_mhz=200).step_ms(cfg, lay, 256)[0],
        "an fp32\nimage at 300 MHz": CycleModel().step_ms(cfg, HbmLayout.for_model(cfg, "float32"), 256)[0],
        "gpt2 (124M)": CycleModel().step_ms(preset("gpt2"), HbmLayout.for_model(preset("gpt2")), 256)[0],
    }
    for label, ms in got.items():
        assert f"{label} {ms:.2f} ms" in s, label
    llama = preset("llama-7b")
    ms = CycleModel().step_ms(llama, HbmLayout.for_model(llama), 256)[0]
    assert f"llama-7b {ms:.1f} ms" in s and f"gives {ms:.1f} ms/token" in DOC.read_text()


def test_model_follows_the_kernel_structure(medium):
    cfg, lay, m = medium
    assert BandwidthModel is CycleModel      # what the devices construct by default
    ms = [m.step_ms(cfg, lay, n)[0] for n in (1, 32, 33, 256, 1024)]
    assert ms == sorted(ms) and ms[0] > 0
    # HBM-bound above 224.6 MHz: the weight stream takes the same time at any clock ...
    w = [CycleModel(clock_mhz=f).layer_fixed(cfg, lay)["weights"] / f for f in (250, 300, 400)]
    assert w[0] == pytest.approx(w[1]) == pytest.approx(w[2])
    # ... and MAC-bound (one word per cycle) below it
    slow = CycleModel(clock_mhz=100)
    assert slow.words_per_cycle > 1
    assert slow.layer_fixed(cfg, lay)["weights"] == 12_297
    # an fp32 image streams twice the words
    f32 = m.layer_fixed(cfg, HbmLayout.for_model(cfg, "float32"))["weights"]
    assert f32 == pytest.approx(2 * m.layer_fixed(cfg, lay)["weights"], rel=1e-3)
    # the source's figure is a comparison, not an input: no field of the model holds it
    assert SOURCE_MS_PER_TOKEN not in vars(m).values()
    # the bytes a step reads: ~710 MB of weights + the live KV
    _, nbytes = m.step_ms(cfg, lay, 256)
    assert 700e6 < nbytes < 760e6


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_any_model_shape_including_padded_kv(family):
    """Every term is defined for small, GQA and padded-lane models (kv_dim 48, 60)."""
    m = CycleModel()
    if family == "gpt2":
        cfg = replace(preset("tiny-gpt2"), d_model=48, n_heads=3, n_kv_heads=3, d_ff=192)
    else:
        cfg = replace(preset("tiny-llama"), d_model=120, n_heads=6, n_kv_heads=3)
    lay = HbmLayout.for_model(cfg, "float16")
    assert lay.kv_pad
    lc = m.layer_cycles(cfg, lay, 40)
    assert lc["att_gather"] == 64 * (cfg.n_heads // cfg.n_kv_heads)   # padded lanes stream
    assert ("rope" in lc) == (family == "llama")
    assert all(v >= 0 for v in lc.values()) and m.step_ms(cfg, lay, 40)[0] > 0


def test_emulator_doc_table_matches():
    """docs/fpga-emulator.md's presets table comes from the same model."""
    text = (DOC.parent / "fpga-emulator.md").read_text()
    rows = re.findall(r"^\| ([\w-]+) \| \**([\d.]+)\** \| \**([\d.]+)\** \| \**([\d.]+)\** \| ([\d.]+) \|$",
                      text, re.M)
    assert [r[0] for r in rows] == ["gpt2", "gpt2-medium", "gpt2-large", "llama-7b"]
    m = CycleModel()
    for name, *cols in rows:
        cfg = preset(name)
        lay = HbmLayout.for_model(cfg, "float16")
        want = [m.step_ms(cfg, lay, n)[0] for n in (64, 256, 512)]
        want.append(m.cycles_to_ms(m.streaming_cycles(cfg, lay, 256)))
        assert [float(c) for c in cols] == [round(w, 2) for w in want], name
