"""Placement: is a request faster on GPU only, FPGA only, or split (GPU prefill + FPGA decode)?

The source's model (its equations 4 and 5), with P = prefill time, D = decode time for
the request's output tokens, T = the KV transfer between the devices:

    hybrid beats GPU-only  iff  D_gpu - D_fpga > T      (eq. 4)
    hybrid beats FPGA-only iff  P_fpga - P_gpu > T      (eq. 5)

Stage times come from piecewise-linear models whose defaults are the source's measured
figures (gpt2-medium, A10 + U55C, see seed-summary.md); pass measured ones to replace them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median

from engine.errors import InvalidArgument


def _interp(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through `points` (sorted by x), extended linearly past both ends."""
    xs = [p[0] for p in points]
    if len(points) == 1:
        return points[0][1] * x / xs[0] if xs[0] else points[0][1]
    i = min(max(bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _points(pairs: Sequence[tuple[float, float]], what: str) -> tuple[tuple[float, float], ...]:
    pts = tuple(sorted((float(a), float(b)) for a, b in pairs))
    if not pts or any(x <= 0 or y < 0 for x, y in pts):
        raise InvalidArgument(f"{what}: need (tokens > 0, ms >= 0) points, got {pairs!r}")
    if len({x for x, _ in pts}) != len(pts):
        raise InvalidArgument(f"{what}: duplicate token counts in {pairs!r}")
    return pts


# The source's measurements (seed-summary.md, "Their results").
SOURCE_GPU_PREFILL = ((64, 7.6), (256, 10.3), (512, 15.3))
SOURCE_FPGA_PREFILL = ((64, 156.0), (256, 614.0), (512, 1248.0))
SOURCE_GPU_DECODE_MS = 5.0
SOURCE_FPGA_DECODE_MS = 3.4
SOURCE_TRANSFER_MS = 180.0  # measured 150-215 ms whatever the lengths (fixed 1024-token buffer)


@dataclass(frozen=True)
class StageModel:
    """Stage times in ms. Prefill: (input tokens, ms) points; decode: ms per output token;
    transfer: fixed ms plus ms per input token (the source's was fixed; ours moves only
    live tokens, so a measured per-token cost fits it better)."""

    gpu_prefill: tuple[tuple[float, float], ...] = SOURCE_GPU_PREFILL
    fpga_prefill: tuple[tuple[float, float], ...] = SOURCE_FPGA_PREFILL
    gpu_decode_ms: float = SOURCE_GPU_DECODE_MS
    fpga_decode_ms: float = SOURCE_FPGA_DECODE_MS
    transfer_ms: float = SOURCE_TRANSFER_MS
    transfer_ms_per_token: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_prefill", _points(self.gpu_prefill, "gpu_prefill"))
        object.__setattr__(self, "fpga_prefill", _points(self.fpga_prefill, "fpga_prefill"))
        for name in ("gpu_decode_ms", "fpga_decode_ms", "transfer_ms", "transfer_ms_per_token"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")

    def prefill_ms(self, device: str, n_input: int) -> float:
        return max(0.0, _interp(self.gpu_prefill if device == "gpu" else self.fpga_prefill, n_input))

    def transfer(self, n_input: int) -> float:
        return self.transfer_ms + self.transfer_ms_per_token * n_input


@dataclass(frozen=True)
class Plan:
    n_input: int
    n_output: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # gpu-only, fpga-only, hybrid
    choice: str = ""
    eq4_hybrid_beats_gpu: bool = False
    eq5_hybrid_beats_fpga: bool = False


def plan(n_input: int, n_output: int, model: StageModel | None = None) -> Plan:
    """Predict the three end-to-end latencies and pick the fastest.

    Token 0 comes from prefill, so decode runs n_output - 1 steps."""
    if n_input < 1 or n_output < 1:
        raise InvalidArgument(f"need --input >= 1 and --output >= 1, got {n_input}:{n_output}")
    m = model or StageModel()
    steps = n_output - 1
    p_gpu, p_fpga = m.prefill_ms("gpu", n_input), m.prefill_ms("fpga", n_input)
    d_gpu, d_fpga = steps * m.gpu_decode_ms, steps * m.fpga_decode_ms
    t = m.transfer(n_input)
    lat = {"gpu-only": p_gpu + d_gpu, "fpga-only": p_fpga + d_fpga, "hybrid": p_gpu + t + d_fpga}
    eq4, eq5 = d_gpu - d_fpga > t, p_fpga - p_gpu > t
    # The equations and the totals agree by construction; the choice is the minimum.
    choice = min(lat, key=lambda k: (lat[k], k))
    return Plan(n_input, n_output, lat, choice, eq4, eq5)


def modeled_fpga_decode_ms(model: str, n_input: int, n_output: int,
                           hbm_dtype: str = "float16", clock_mhz: float = 300.0) -> float:
    """FPGA decode ms/token from the derived cycle model of the hbm_decode kernel
    (docs/fpga-kernel.md, fpga_service/device/bandwidth.py) for a preset model, at the
    request's mid-decode context and the kernel clock `clock_mhz`."""
    from engine.config import preset
    from fpga_service.device.bandwidth import CycleModel
    from kernels.hbm_layout import HbmLayout

    try:
        cfg = preset(model)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    if not clock_mhz > 0:
        raise InvalidArgument(f"the FPGA clock must be positive, got {clock_mhz} MHz")
    ctx = n_input + max(n_output - 1, 1) // 2
    ms, _ = CycleModel(clock_mhz=clock_mhz).step_ms(cfg, HbmLayout.for_model(cfg, hbm_dtype), ctx)
    return ms


@dataclass(frozen=True)
class Measured:
    """GPU stage times taken from a `hybrid bench` sweep (bench/results/sweep.json)."""

    gpu_prefill: tuple[tuple[float, float], ...]  # (input tokens, ms) of the local engine
    gpu_decode_ms: float                          # median ms/token of the local engine
    transfer_ms: float                            # median hand-off cost of the pair
    source: str


def measured_from_sweep(data: dict, source: str = "sweep.json") -> Measured:
    """Prefill and decode from the sweep's `local` rows; transfer = what the pair's TTFT
    adds to the engine's own prefill at the same input length (KV hand-off not hidden,
    the service's extra work and hops), median over the pair's rows: the T of eqs. 4
    and 5 as this system pays it."""
    rows = data.get("rows", [])
    local = [r for r in rows if r.get("path") == "local"]
    pair = [r for r in rows if r.get("path") == "pair"]
    if not local or not pair:
        raise InvalidArgument(f"{source}: needs 'local' and 'pair' rows (run hybrid bench "
                              f"with both paths)")
    by_in: dict[int, list[float]] = {}
    for r in local:
        by_in.setdefault(int(r["n_in"]), []).append(float(r["prefill_ms"]))
    prefill = tuple((n, median(v)) for n, v in sorted(by_in.items()))
    decode = median([float(r["decode_ms_per_token"]) for r in local])
    local_prefill = dict(prefill)
    extra = [float(r["ttft_ms"]) - local_prefill[int(r["n_in"])] for r in pair
             if int(r["n_in"]) in local_prefill]
    if not extra:
        raise InvalidArgument(f"{source}: no 'pair' row shares an input length with 'local'")
    transfer = max(0.0, median(extra))
    return Measured(_points(prefill, "measured GPU prefill"), decode, transfer, source)

