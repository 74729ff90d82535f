"""`hybrid bench`: the source document's latency sweep beside HF transformers, measured in
one run (bench/sweep.py does the work)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def _bench_modules():
    # bench/ sits beside client/ in the repository; it is not an installed package
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import report, sweep

    return sweep, report


@click.command()
@click.option("--model", default="synthetic:gpt2-medium", show_default=True)
@click.option("--device", default=None, help="cpu|cuda|cuda:N (default: cuda if present)")
@click.option("--points", default="64:64,64:256,64:512,256:64,256:256,256:512,512:64,512:256,512:512",
              show_default=True, help="IN:OUT token counts")
@click.option("--paths", default=",".join(("hf-eager", "hf-static", "local", "pair", "fpga-proj")),
              show_default=True, help="which paths to measure")
@click.option("--reps", default=3, show_default=True, help="timed runs per point (median)")
@click.option("--kv-transport", type=click.Choice(["shm", "grpc"]), default="shm", show_default=True)
@click.option("--out", "out_dir", default="bench/results", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def bench(model: str, device: str | None, points: str, paths: str, reps: int,
          kv_transport: str, out_dir: Path) -> None:
    """Latency sweep: HF eager/static, our engine, the service pair, FPGA projection."""
    import torch

    sweep, report = _bench_modules()
    try:
        pts = sweep.parse_points(points)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    chosen = [p.strip() for p in paths.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(sweep.PATHS))
    if unknown:
        raise click.BadParameter(f"unknown path(s) {unknown}; known: {', '.join(sweep.PATHS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows, meta, files = sweep.run_sweep(model, device, pts, reps, chosen, out_dir, kv_transport)
    click.echo(files["md"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))
