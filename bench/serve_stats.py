"""Statistics and reports of `hybrid bench serve` (bench/bench_serve.py runs the load).

One `RequestRecord` per request: when it was sent, when each streamed chunk of tokens
arrived, when its stream ended, how many tokens came back, and its outcome (a gRPC status
name, "OK" for success). From these, per load point and the same way as vLLM's
benchmarks/benchmark_serving.py (`calculate_metrics`):

- TTFT = first chunk - send; E2E = stream end - send;
- TPOT per request = (E2E - TTFT) / (n_output - 1), only for n_output > 1;
- ITL = every gap between successive chunk arrivals of a request (one chunk per decode
  step here, so a gap per token);
- request/s, output tok/s and total tok/s over the point's wall time;
- goodput = requests/s that met every SLO bound (a request with one token has TPOT 0,
  as in vLLM); failures are never good and are left out of every latency statistic;
- mean and linear-interpolated p50/p90/p99 (numpy.percentile, as vLLM).

Reports: a Markdown table, JSON with null for any non-finite number (strict JSON parsers
reject NaN), and a PNG (matplotlib, when installed) of throughput against TPOT and TTFT.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Service-level bounds a request must meet to count toward goodput (None: no bound)."""
    ttft_ms: float | None = 200.0
    tpot_ms: float | None = 5.0

    def met_by(self, rec: RequestRecord) -> bool:
        if not rec.ok or rec.ttft_s is None:
            return False
        if self.ttft_ms is not None and rec.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = rec.tpot_s or 0.0  # one-token requests have no TPOT: vLLM counts 0
        return self.tpot_ms is None or tpot * 1e3 <= self.tpot_ms

    def describe(self) -> str:
        parts = [f"{k} <= {v:g} ms" for k, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms))
                 if v is not None]
        return " and ".join(parts) or "none"


@dataclass(frozen=True)
class RequestRecord:
    prompt_len: int
    output_len: int                          # requested (ignore_eos: what should come back)
    start: float                             # time.perf_counter() when sent
    end: float                               # when its stream ended or failed
    chunk_times: tuple[float, ...] = ()      # arrival of each chunk carrying token ids
    n_output: int = 0                        # token ids received
    status: str = "OK"                       # gRPC status name of a failure
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e_s(self) -> float:
        return self.end - self.start

    @property
    def tpot_s(self) -> float | None:
        if self.n_output < 2 or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.n_output - 1)

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


class Stopwatch:
    """Builds one RequestRecord while its request runs (from one thread or task)."""

    def __init__(self, prompt_len: int, output_len: int) -> None:
        self.prompt_len, self.output_len = prompt_len, output_len
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.n = 0

    def tokens(self, n: int) -> None:
        if n > 0:  # a chunk without ids (text only) is no token arrival
            self.times.append(time.perf_counter())
            self.n += n

    def done(self, status: str = "OK", error: str = "") -> RequestRecord:
        return RequestRecord(self.prompt_len, self.output_len, self.start, time.perf_counter(),
                             tuple(self.times), self.n, status, error)


def distribution(xs: Sequence[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 of `xs` (all None when empty)."""
    if not len(xs):
        return {"mean": None} | {f"p{q}": None for q in QUANTILES}
    arr = np.asarray(xs, dtype=np.float64)
    return {"mean": float(arr.mean())} | {f"p{q}": float(np.percentile(arr, q)) for q in QUANTILES}


def status_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Every non-OK outcome by status name, most frequent first."""
    return dict(Counter(r.status for r in records if not r.ok).most_common())


def error_samples(records: Iterable[RequestRecord]) -> dict[str, str]:
    """The first message seen per failing status: enough to tell what went wrong."""
    out: dict[str, str] = {}
    for r in records:
        if not r.ok and r.status not in out:
            out[r.status] = r.error[:300]
    return out


def _per_s(n: float, duration_s: float) -> float | None:
    return n / duration_s if duration_s > 0 else None


def latency_stats(ok: list[RequestRecord]) -> dict[str, dict]:
    ms = 1e3
    return {
        "ttft_ms": distribution([r.ttft_s * ms for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution([r.tpot_s * ms for r in ok if r.tpot_s is not None]),
        "itl_ms": distribution([g * ms for r in ok for g in r.itl_s]),
        "e2e_ms": distribution([r.e2e_s * ms for r in ok]),
    }


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict:
    """One load point's metrics (see the module docstring)."""
    ok = [r for r in records if r.ok]
    n_in, n_out = sum(r.prompt_len for r in ok), sum(r.n_output for r in ok)
    good = sum(slo.met_by(r) for r in ok)
    return {
        "completed": len(ok), "failed": len(records) - len(ok),
        "errors": status_counts(records), "error_samples": error_samples(records),
        "short_outputs": sum(r.n_output < r.output_len for r in ok),  # ignore_eos: want 0
        "duration_s": duration_s, "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": _per_s(len(ok), duration_s),
        "output_throughput": _per_s(n_out, duration_s),
        "total_token_throughput": _per_s(n_in + n_out, duration_s),
        **latency_stats(ok),
        "good_requests": good, "goodput": _per_s(good, duration_s),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
    }


# ---- reports ------------------------------------------------------------------------

def json_safe(x):
    """`x` with NaN/inf floats as None and numpy scalars as Python numbers."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def dumps(report: dict) -> str:
    return json.dumps(json_safe(report), indent=1, allow_nan=False)


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _pair(d: dict, nd: int) -> str:
    return f"{_f(d['p50'], nd)} / {_f(d['p99'], nd)}"


COLUMNS = ("target", "load", "done", "failed", "req/s", "out tok/s", "TTFT p50/p99 ms",
           "TPOT p50/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 ms", "goodput req/s", "errors")


def table_row(p: dict) -> list[str]:
    errs = ", ".join(f"{k} {v}" for k, v in p["errors"].items()) or "-"
    return [p["target"], p["label"], str(p["completed"]), str(p["failed"]),
            _f(p["request_throughput"], 2), _f(p["output_throughput"]),
            _pair(p["ttft_ms"], 1), _pair(p["tpot_ms"], 2), _pair(p["itl_ms"], 2),
            _pair(p["e2e_ms"], 0), _f(p["goodput"], 2), errs]


def markdown(report: dict) -> str:
    lines = [header(report), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(p)) + " |" for p in report["points"]]
    return "\n".join(lines) + "\n"


def header(report: dict) -> str:
    m = report["meta"]
    devs = "; ".join(f"{name}: {t.get('device', '?')}" for name, t in m["targets"].items())
    return (f"hybrid bench serve: {m['model']} ({devs}); lengths {m['lengths']}; "
            f"goodput SLO {m['slo']}; ignore_eos, greedy, warm-up {m['config']['warmup']} "
            f"requests per target")


def chart(report: dict, path: Path) -> Path | None:
    """Output tok/s against TPOT p50/p99 and TTFT p50/p99, one colour per target and a
    line per load mode; None when matplotlib is not installed (like bench/report.py)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, name in ((axes[0], "tpot_ms", "TPOT"), (axes[1], "ttft_ms", "TTFT")):
        _plot_metric(ax, report["points"], metric)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{name} ms (solid p50, dashed p99)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(header(report), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class _Series:
    x: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)


def _plot_metric(ax, points: list[dict], metric: str) -> None:
    series: dict[tuple[str, str], _Series] = {}
    for p in points:
        d = p[metric]
        if p["output_throughput"] is None or d["p50"] is None:
            continue
        s = series.setdefault((p["target"], p["mode"]), _Series())
        s.x.append(p["output_throughput"])
        s.p50.append(d["p50"])
        s.p99.append(d["p99"])
    colors = {}
    for (target, mode), s in series.items():
        c = colors.setdefault(target, f"C{len(colors)}")
        marker = "o" if mode == "concurrency" else "s"
        ax.plot(s.x, s.p50, color=c, marker=marker, label=f"{target}, {mode}")
        ax.plot(s.x, s.p99, color=c, marker=marker, linestyle="--")  # one legend entry each
