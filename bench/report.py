"""Turn sweep rows into a Markdown table, JSON and a PNG bar chart."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from bench.sweep import Row

BASELINES = ("hf-eager", "hf-static", "local")


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def speedups(rows: list[Row]) -> dict[tuple[str, int, int], dict[str, float]]:
    by = {(r.path, r.n_in, r.n_out): r.total_ms for r in rows}
    out = {}
    for r in rows:
        out[(r.path, r.n_in, r.n_out)] = {
            b: by[(b, r.n_in, r.n_out)] / r.total_ms
            for b in BASELINES if (b, r.n_in, r.n_out) in by and b != r.path}
    return out


def markdown(rows: list[Row], header: str) -> str:
    sp = speedups(rows)
    base = [b for b in BASELINES if any(r.path == b for r in rows)]
    cols = ["in:out", "path", "total ms", "TTFT", "prefill", "raw xfer", "exposed", "ms/token",
            *[f"vs {b}" for b in base]]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r.n_in, r.n_out, r.path)):
        s = sp[(r.path, r.n_in, r.n_out)]
        name = r.path + (" (projected)" if r.label == "projected" else "")
        cells = [f"{r.n_in}:{r.n_out}", name, _f(r.total_ms), _f(r.ttft_ms, 2),
                 _f(r.prefill_ms, 2), _f(r.transfer_ms, 2), _f(r.exposed_transfer_ms, 3),
                 _f(r.decode_ms_per_token, 3), *[f"{s[b]:.2f}x" if b in s else "-" for b in base]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def roofline_text(meta: dict) -> str:
    """The weight-read roofline, or n/a where no copy bandwidth was measured (CPU)."""
    roof, gbps = meta.get("roofline_ms_per_token"), meta.get("copy_gbps")
    if roof is None or gbps is None or not (math.isfinite(roof) and math.isfinite(gbps)):
        return "decode roofline n/a (no memory bandwidth measured on this device)"
    return f"decode roofline {roof:.3f} ms/token at {gbps:.0f} GB/s"


def fpga_model_text(meta: dict) -> str:
    """Where the fpga-proj rows' decode comes from, with the source's figure beside it."""
    m = meta.get("fpga_model")
    if not m:
        return ""
    return (f"; fpga-proj decode: {m['model']}, {m['ms_per_token_at_256']:.2f} ms/token at "
            f"256 tokens of context; {m['source']}: {m['source_ms_per_token']} ms/token")


def _finite(x):
    """NaN and infinities -> None, through dicts, lists and tuples."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write(rows: list[Row], meta: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "sweep.json", "md": out_dir / "sweep.md"}
    slim = [{k: v for k, v in asdict(r).items() if k != "extra"}
            | {"kv_bytes": r.extra.get("kv_bytes")} for r in rows]
    # strict JSON: an unknown figure is null, never a bare NaN/Infinity
    paths["json"].write_text(json.dumps(_finite({"meta": meta, "rows": slim}), indent=1,
                                        allow_nan=False))
    head = (f"{meta['model']} on {meta['device_name']} ({meta['dtype']}), median of "
            f"{meta['reps']} after a warm-up; {roofline_text(meta)}{fpga_model_text(meta)}")
    paths["md"].write_text(markdown(rows, head))
    png = chart(rows, out_dir / "sweep.png", head)
    if png:
        paths["png"] = png
    return paths


def chart(rows: list[Row], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = sorted({(r.n_in, r.n_out) for r in rows})
    names = [p for p in ("hf-eager", "hf-static", "local", "pair", "fpga-proj")
             if any(r.path == p for r in rows)]
    by = {(r.path, r.n_in, r.n_out): r.total_ms for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(points)), 4.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * w for j in range(len(points))]
        ax.bar(xs, [by.get((n, *p), 0) for p in points], w, label=n)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(points))])
    ax.set_xticklabels([f"{a}:{b}" for a, b in points])
    ax.set_ylabel("latency, ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
