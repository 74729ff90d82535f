"""`hybrid bench`: the source document's latency sweep beside HF transformers, measured in
one run (bench/sweep.py does the work); `hybrid bench serve`: a serving benchmark under
concurrent and Poisson load (bench/bench_serve.py, modelled on vLLM's benchmark_serving)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from client.security_opts import pop_security, security_options, security_or_exit


def _repo_on_path() -> None:
    # bench/ is packaged with client/ (pyproject's packages.find); in a checkout it sits
    # beside client/, which an editable install made before it was packaged may not map
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import bench  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "bench":
            raise
        raise click.ClickException("the bench package is not installed with this build of "
                                   "hybrid-llm (installed before bench was packaged?): "
                                   "reinstall it (pip install ., or pip install -e . in a "
                                   "checkout)") from None


def _bench_modules():
    _repo_on_path()
    from bench import report, sweep

    return sweep, report


# A group that still runs the sweep when invoked bare, so `hybrid bench [options]` is
# unchanged; the sweep's options belong to the group and apply only to the bare form.
@click.group(invoke_without_command=True)
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
@click.pass_context
def bench(ctx: click.Context, model: str, device: str | None, points: str, paths: str,
          reps: int, kv_transport: str, out_dir: Path) -> None:
    """Latency sweep: HF eager/static, our engine, the service pair, FPGA projection.

    `hybrid bench serve --help`: serving throughput and latency under load."""
    if ctx.invoked_subcommand is not None:
        return
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


def _parsed(parse, text: str | None, name: str):
    if text is None:
        return ()
    try:
        return parse(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=name) from None


_OPT_PATH = dict(default=None, type=click.Path(dir_okay=False, path_type=Path))


@bench.command("serve")
@click.option("--target", type=click.Choice(["pair", "local", "both"]), default="pair",
              show_default=True, help="both: the pair and the local engine at the same points")
@click.option("--model", default=None,
              help="default: the running pair's, else synthetic:gpt2-medium")
@click.option("--device", default=None, help="cpu|cuda|cuda:N (default: cuda if present)")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--prefill", "prefill_addr", default=None, help="running prefill service ADDR")
@click.option("--decode", "decode_addr", default=None, help="running decode service ADDR")
@click.option("--backend", default="gpu", show_default=True, help="decode backend of a started pair")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="local engine batch rows; --max-batch of a started decoder "
                   "(which then admits 2x as many)")
@click.option("--concurrency", default=None,
              help="closed-loop client counts [default: 1,4,16,64,256 unless --rate]")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="per concurrency level")
@click.option("--requests", type=click.IntRange(min=1), default=None,
              help="requests per concurrency level (instead of --duration-s)")
@click.option("--rate", default=None, help="open-loop Poisson rates, req/s, e.g. 10,50,inf")
@click.option("--num-requests", type=click.IntRange(min=1), default=200, show_default=True,
              help="requests per rate")
@click.option("--burstiness", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="gamma shape of arrival gaps (1 = Poisson)")
@click.option("--input-len", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--dist", type=click.Choice(["fixed", "lognormal"]), default="fixed",
              show_default=True, help="lognormal: lengths around the means, clipped to the model")
@click.option("--sigma", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="lognormal sigma")
@click.option("--seed", default=0, show_default=True)
@click.option("--slo-ttft-ms", type=click.FloatRange(min=0), default=200.0, show_default=True,
              help="goodput bound (0 = none)")
@click.option("--slo-tpot-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="goodput bound (0 = none)")
@click.option("--warmup", type=click.IntRange(min=0), default=4, show_default=True,
              help="requests per target before measuring")
@click.option("--timeout-s", type=float, default=600.0, show_default=True, help="per request (pair)")
@click.option("--clients-per-channel", type=click.IntRange(min=1), default=32, show_default=True,
              help="pair: concurrent clients sharing one HybridClient")
@click.option("--region-mb", type=int, default=1024, show_default=True,
              help="KV region of a started prefill service")
@click.option("--kv-device/--no-kv-device", default=True, show_default=True,
              help="pair: let the client ask for the GPU-to-GPU KV hand-over (CUDA IPC) "
                   "where the decode mapped the prefill GPU's KV buffer; --no-kv-device: "
                   "always the shared pinned host region")
@click.option("--log-dir", default=None, help="keep a started pair's logs here")
@click.option("--prefill-arg", "prefill_args", multiple=True,
              help="extra flag for a started prefill service, e.g. --prefill-arg=--max-slots=128")
@click.option("--decode-arg", "decode_args", multiple=True,
              help="extra flag for a started decode service, e.g. --decode-arg=--max-active=64")
@click.option("--json", "json_path", **_OPT_PATH)
@click.option("--md", "md_path", **_OPT_PATH)
@click.option("--png", "png_path", **_OPT_PATH)
@security_options
def serve(**kw) -> None:
    """Serving benchmark (like vLLM's benchmark_serving): TTFT, TPOT, ITL, E2E, throughput
    and goodput under closed-loop concurrency and open-loop Poisson load. The TLS and
    token options apply to running services (--prefill/--decode)."""
    _repo_on_path()
    from bench import bench_serve as bs
    from bench.serve_stats import Slo, markdown

    outs = {k: kw.pop(k) for k in ("json_path", "md_path", "png_path")}
    kw["security"] = security_or_exit(**pop_security(kw))
    if kw["security"] is not None and kw["prefill_addr"] is None:
        err = click.ClickException("--tls-*/--token-file/HYBRID_TOKEN apply to running "
                                   "services: give --prefill and --decode")
        err.exit_code = 2
        raise err
    try:
        cfg = _config(bs, Slo, kw)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from engine.errors import HybridError

    try:
        report = bs.run(cfg)
    except (ValueError, RuntimeError, HybridError) as e:  # lengths too long, no service, ...
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    click.echo(markdown(report))
    for msg in bs.write_reports(report, outs["json_path"], outs["md_path"], outs["png_path"]):
        click.echo(msg)


def _config(bs, slo_cls, kw: dict):
    target = kw.pop("target")
    conc = _parsed(bs.parse_ints, kw.pop("concurrency"), "--concurrency")
    rates = _parsed(bs.parse_rates, kw.pop("rate"), "--rate")
    slo = slo_cls(kw.pop("slo_ttft_ms") or None, kw.pop("slo_tpot_ms") or None)
    targets = ("pair", "local") if target == "both" else (target,)
    return bs.ServeBenchConfig(targets=targets, concurrency=conc, rates=rates, slo=slo, **kw)
