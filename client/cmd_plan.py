"""`hybrid plan`: predict GPU-only / FPGA-only / hybrid latency for an input:output shape."""

from __future__ import annotations

import click

from engine.errors import HybridError


def _pairs(text: str | None, default):
    """Parse "64:7.6,256:10.3" into ((64, 7.6), (256, 10.3))."""
    if not text:
        return default
    try:
        return tuple(tuple(float(v) for v in item.split(":")) for item in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected TOKENS:MS[,TOKENS:MS...], got {text!r}") from None


def _measured(path: str, gpu_prefill, gpu_decode_ms, transfer_ms):
    """The sweep's figures, each unless the matching option was given."""
    import json
    from pathlib import Path

    from fpga_service import placement as P

    m = P.measured_from_sweep(json.loads(Path(path).read_text()), path)
    click.echo(f"measured ({path}): GPU decode {m.gpu_decode_ms:.3f} ms/token, transfer "
               f"{m.transfer_ms:.2f} ms, GPU prefill "
               + ", ".join(f"{int(n)}:{ms:.1f}" for n, ms in m.gpu_prefill))
    prefill = gpu_prefill or ",".join(f"{n}:{ms}" for n, ms in m.gpu_prefill)
    return (prefill, m.gpu_decode_ms if gpu_decode_ms is None else gpu_decode_ms,
            m.transfer_ms if transfer_ms is None else transfer_ms)


@click.command()
@click.option("--input", "n_input", type=int, required=True, help="prompt tokens")
@click.option("--output", "n_output", type=int, required=True, help="generated tokens")
@click.option("--gpu-prefill", help="measured GPU prefill, TOKENS:MS,... (default: the source's)")
@click.option("--fpga-prefill", help="measured FPGA prefill, TOKENS:MS,...")
@click.option("--gpu-decode-ms", type=float, help="GPU decode ms per token (source: 5.0)")
@click.option("--fpga-decode-ms", type=float, help="FPGA decode ms per token (source: 3.4)")
@click.option("--fpga-model", help="take FPGA decode ms/token from the derived cycle model of "
              "the hbm_decode kernel (docs/fpga-kernel.md) for this preset (e.g. gpt2-medium)")
@click.option("--fpga-clock-mhz", type=float, default=300.0, show_default=True,
              help="the kernel clock of the cycle model")
@click.option("--transfer-ms", type=float, help="fixed KV transfer ms (source: 150-215; 180)")
@click.option("--transfer-ms-per-token", type=float, default=0.0, show_default=True)
@click.option("--measured", "measured_path", type=click.Path(exists=True, dir_okay=False),
              help="take GPU prefill, GPU decode and transfer from a `hybrid bench` "
              "sweep.json (explicit options still win)")
def plan(n_input, n_output, gpu_prefill, fpga_prefill, gpu_decode_ms, fpga_decode_ms,
         fpga_model, fpga_clock_mhz, transfer_ms, transfer_ms_per_token, measured_path) -> None:
    """Predict the three latencies from stage-time models (the source's eqs. 4 and 5).

    Every stage time not given defaults to the source document's measured figure (GPU
    prefill 64:7.6,256:10.3,512:15.3 ms; FPGA prefill 64:156,256:614,512:1248 ms; GPU
    decode 5.0 and FPGA decode 3.4 ms/token; KV transfer 180 ms), not to this machine's:
    pass --measured (a `hybrid bench` sweep.json) or the options for your own."""
    from fpga_service import placement as P

    try:
        if measured_path:
            gpu_prefill, gpu_decode_ms, transfer_ms = _measured(
                measured_path, gpu_prefill, gpu_decode_ms, transfer_ms)
        source = (f"source (DFX on a U55C, gpt2-medium, measured): "
                  f"{P.SOURCE_FPGA_DECODE_MS} ms/token")
        if fpga_model:
            fpga_decode_ms = P.modeled_fpga_decode_ms(fpga_model, n_input, n_output,
                                                      clock_mhz=fpga_clock_mhz)
            click.echo(f"FPGA decode from the derived hbm_decode cycle model of {fpga_model} "
                       f"({fpga_clock_mhz:g} MHz): {fpga_decode_ms:.3f} ms/token; {source}")
        elif fpga_decode_ms is None:
            derived = P.modeled_fpga_decode_ms("gpt2-medium", n_input, n_output,
                                               clock_mhz=fpga_clock_mhz)
            click.echo(f"FPGA decode: {source}; the derived hbm_decode cycle model of "
                       f"gpt2-medium ({fpga_clock_mhz:g} MHz): {derived:.3f} ms/token "
                       f"(--fpga-model uses it)")
        model = P.StageModel(
            gpu_prefill=_pairs(gpu_prefill, P.SOURCE_GPU_PREFILL),
            fpga_prefill=_pairs(fpga_prefill, P.SOURCE_FPGA_PREFILL),
            gpu_decode_ms=P.SOURCE_GPU_DECODE_MS if gpu_decode_ms is None else gpu_decode_ms,
            fpga_decode_ms=P.SOURCE_FPGA_DECODE_MS if fpga_decode_ms is None else fpga_decode_ms,
            transfer_ms=P.SOURCE_TRANSFER_MS if transfer_ms is None else transfer_ms,
            transfer_ms_per_token=transfer_ms_per_token,
        )
        result = P.plan(n_input, n_output, model)
    except HybridError as e:
        raise click.UsageError(str(e)) from None
    defaults = [name for name, given in (
        ("GPU prefill", gpu_prefill), ("FPGA prefill", fpga_prefill),
        ("GPU decode", gpu_decode_ms), ("FPGA decode", fpga_decode_ms),
        ("transfer", transfer_ms)) if given is None or given == ""]
    if defaults:
        click.echo(f"defaults: the source document's figures for {', '.join(defaults)} "
                   f"(not measured here; --measured or the options give your own)")
    click.echo(f"input:output  {n_input}:{n_output}")
    for name, ms in result.latency_ms.items():
        mark = "  <- choice" if name == result.choice else ""
        click.echo(f"{name:<10}  {ms:10.1f} ms{mark}")
    click.echo(f"eq.4 hybrid beats gpu-only:  {result.eq4_hybrid_beats_gpu}  "
               f"(GPU decode - FPGA decode > transfer)")
    click.echo(f"eq.5 hybrid beats fpga-only: {result.eq5_hybrid_beats_fpga}  "
               f"(FPGA prefill - GPU prefill > transfer)")
    click.echo(f"choice: {result.choice}")
