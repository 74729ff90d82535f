"""The source document's sweep (inputs x outputs of 64/256/512) for every path a user
could pick, measured in one run on one device:

- `hf-eager`, `hf-static`: HF transformers `generate()` (random weights of the same shape)
- `local`: our single-process engine ("GPU only")
- `pair`: both services, `gpu` decode backend ("hybrid", measured)
- `fpga-proj`: the pair's measured TTFT (prefill + exposed transfer) plus the U55C
  decode of the derived hbm_decode cycle model, fpga_service.device.bandwidth
  ("projected", not measured; the report names it next to the source's 3.4 ms/token)

Every row: median total ms over `reps` runs after a warm-up, the stage breakdown and the
speedup over each baseline; the weight-read roofline per token. Writes JSON, Markdown and
a PNG bar chart (like the source's figure 21) under `out_dir`.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PATHS = ("hf-eager", "hf-static", "local", "pair", "fpga-proj")


@dataclass
class Row:
    path: str
    n_in: int
    n_out: int
    total_ms: float
    ttft_ms: float | None = None
    prefill_ms: float | None = None
    transfer_ms: float | None = None
    exposed_transfer_ms: float | None = None
    decode_ms_per_token: float | None = None
    label: str = "measured"
    extra: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median(fn, reps: int) -> tuple[float, list]:
    fn()  # warm-up: graph capture, cuBLAS handles, service connections
    outs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        outs.append(((time.perf_counter() - t0) * 1e3, out))
    return statistics.median(ms for ms, _ in outs), [o for _, o in outs]


def prompt(vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def run_local(lm, points, reps: int) -> list[Row]:
    from engine.generate import generate

    rows = []
    for n_in, n_out in points:
        ids = prompt(lm.config.vocab_size, n_in)
        ms, outs = _median(lambda ids=ids, n=n_out: generate(lm, ids, n, ignore_eos=True), reps)
        t = outs[-1].timings
        rows.append(Row("local", n_in, n_out, ms, ttft_ms=t["prefill_ms"],
                        prefill_ms=t["prefill_ms"],
                        decode_ms_per_token=t["decode_ms"] / max(1, n_out - 1),
                        extra={"token_ids": outs[-1].token_ids}))
        log(f"  local {n_in}:{n_out} {ms:.1f} ms")
    return rows


def run_hf(cfg, device: str, dtype: torch.dtype, points, reps: int, static: bool) -> list[Row]:
    from bench.hf_baseline import hf_generate_ms, hf_model

    model = hf_model(cfg, device, dtype)
    name = "hf-static" if static else "hf-eager"
    rows = []
    for n_in, n_out in points:
        ms = hf_generate_ms(model, n_in, n_out, static, device, reps=reps)
        rows.append(Row(name, n_in, n_out, ms))
        log(f"  {name} {n_in}:{n_out} {ms:.1f} ms")
    del model
    return rows


def run_pair(model: str, device: str, vocab: int, points, reps: int, transport: str) -> list[Row]:
    import tempfile

    from client.launch import ServicePair
    from client.remote import run_remote

    rows = []
    with tempfile.TemporaryDirectory() as logs, ServicePair(
            model=model, device=device, backend="gpu", log_dir=logs,
            prefill_args=["--region-mb", "1024"]) as pair:
        for n_in, n_out in points:
            ids = prompt(vocab, n_in)

            def once(ids=ids, n=n_out):
                return run_remote(prompt_ids=ids, max_new_tokens=n, prefill=pair.prefill,
                                  decode=pair.decode, kv_transport=transport,
                                  ignore_eos=True, timeout_s=600)
            ms, outs = _median(once, reps)
            t = {k: statistics.median(o.timings[k] for o in outs) for k in outs[0].timings}
            rows.append(Row("pair", n_in, n_out, ms, ttft_ms=t["ttft_ms"],
                            prefill_ms=t["prefill_ms"], transfer_ms=t["transfer_ms"],
                            exposed_transfer_ms=t["exposed_transfer_ms"],
                            decode_ms_per_token=t["decode_ms_per_token"],
                            extra={"kv_bytes": int(t["kv_bytes"]),  # a count: an int
                                   "token_ids": outs[-1].token_ids}))
            log(f"  pair {n_in}:{n_out} {ms:.1f} ms")
    return rows


def fpga_model_meta(cfg) -> dict:
    """What `fpga-proj` decode comes from, for the report: the derived cycle model of the
    hbm_decode kernel (docs/fpga-kernel.md), and the source's measured figure beside it."""
    from fpga_service.device import bandwidth as bw
    from kernels.hbm_layout import HbmLayout

    model, layout = bw.CycleModel(), HbmLayout.for_model(cfg, "float16")
    return {"model": model.describe(cfg, layout), "clock_mhz": model.clock_mhz,
            "hbm_dtype": layout.dtype,
            "ms_per_token_at_256": model.step_ms(cfg, layout, 256)[0],
            "source_ms_per_token": bw.SOURCE_MS_PER_TOKEN, "source": bw.SOURCE_LABEL}


def fpga_projection(cfg, pair_rows: list[Row]) -> list[Row]:
    """The pair's measured TTFT + the U55C decode of the derived hbm_decode cycle model
    (fp16 HBM image, 300 MHz), step by step at each step's context."""
    from fpga_service.device.bandwidth import CycleModel
    from kernels.hbm_layout import HbmLayout

    model, layout = CycleModel(), HbmLayout.for_model(cfg, "float16")
    rows = []
    for r in pair_rows:
        steps = [model.step_ms(cfg, layout, r.n_in + i)[0] for i in range(1, r.n_out)]
        decode = sum(steps)
        rows.append(Row("fpga-proj", r.n_in, r.n_out, r.ttft_ms + decode, ttft_ms=r.ttft_ms,
                        prefill_ms=r.prefill_ms, transfer_ms=r.transfer_ms,
                        exposed_transfer_ms=r.exposed_transfer_ms,
                        decode_ms_per_token=decode / max(1, len(steps)), label="projected"))
    return rows


def roofline_ms_per_token(lm) -> tuple[float | None, float | None]:
    """(ms/token to read every weight once at the measured copy bandwidth, GB/s); (None,
    None) off CUDA, where no bandwidth is measured (JSON null, "n/a" in the report)."""
    nbytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    if lm.device.type != "cuda":
        return None, None
    x = torch.empty(1 << 29, dtype=torch.uint8, device=lm.device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    return nbytes / bw * 1e3, bw / 1e9


def parse_points(text: str) -> list[tuple[int, int]]:
    try:
        pts = [tuple(int(x) for x in p.split(":")) for p in text.split(",") if p.strip()]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 or min(p) < 1 for p in pts):
        raise ValueError(f"bad --points {text!r}: expected IN:OUT[,IN:OUT...], e.g. 64:64,512:512")
    return pts


def run_sweep(model: str, device: str, points, reps: int, paths, out_dir: Path,
              transport: str = "shm") -> tuple[list[Row], dict, dict]:
    """Measure every path in `paths` at every point; write the reports."""
    from bench.report import write
    from engine.loader import load_model

    lm = load_model(model, device=device, dtype="auto")
    cfg, dtype = lm.config, lm.dtype
    roof, gbps = roofline_ms_per_token(lm)
    meta = {"model": model, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda"
            else "CPU", "reps": reps, "points": points, "roofline_ms_per_token": roof,
            "copy_gbps": gbps, "torch": torch.__version__}
    rows: list[Row] = []
    if "local" in paths:
        log("local engine ...")
        rows += run_local(lm, points, reps)
    del lm
    for name, static in (("hf-eager", False), ("hf-static", True)):
        if name in paths:
            log(f"{name} ...")
            rows += run_hf(cfg, device, dtype, points, reps, static)
    if "pair" in paths or "fpga-proj" in paths:
        log("service pair ...")
        pair = run_pair(model, device, cfg.vocab_size, points, reps, transport)
        rows += pair if "pair" in paths else []
        if "fpga-proj" in paths:
            rows += fpga_projection(cfg, pair)
            meta["fpga_model"] = fpga_model_meta(cfg)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows, meta, write(rows, meta, out_dir)
