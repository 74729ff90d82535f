"""`hybrid demo`: both services on this machine with a synthetic model, one prompt,
the text and the stage timings, then a clean shutdown. Decode runs on the FPGA backend
by default: the software U55C (`fpga-emu`) stands in where no card is, and the demo
prints its modeled U55C time per token; `--backend gpu` decodes with the engine."""

from __future__ import annotations

import glob
import tempfile
import time

import click

_STAGES = [("ttft_ms", "time to first token"), ("queue_ms", "queue (both services)"),
           ("prefill_ms", "prefill compute"), ("transfer_ms", "KV copy, raw"),
           ("exposed_transfer_ms", "KV copy, not hidden"), ("ingest_ms", "decode ingest"),
           ("decode_ms", "decode loop"), ("decode_ms_per_token", "decode per token"),
           ("total_ms", "end to end")]


@click.command()
@click.option("--model", default="synthetic:gpt2", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto = cuda if present")
@click.option("--backend", default="fpga-emu", show_default=True,
              help="decode backend: fpga-emu (software U55C), fpga-xrt (a real U55C) or gpu")
@click.option("--prompt", default="The GPU reads the prompt; the FPGA writes the answer:",
              show_default=True)
@click.option("--max-new-tokens", default=24, show_default=True)
@click.option("--kv-transport", type=click.Choice(["shm", "grpc"]), default="shm", show_default=True)
def demo(model: str, device: str, backend: str, prompt: str, max_new_tokens: int,
         kv_transport: str) -> None:
    """Start prefill + decode locally, generate once, print text and timings, stop."""
    from client.launch import ServicePair
    from client.remote import run_remote

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        pair = ServicePair(model=model, device=device, backend=backend, log_dir=logs)
        click.echo(f"starting prefill ({pair.prefill}) and decode ({pair.decode}, "
                   f"backend {backend}) with {model} ...", err=True)
        with pair:
            click.echo(f"both SERVING after {time.perf_counter() - t0:.1f}s", err=True)
            res = run_remote(prompt, max_new_tokens=max_new_tokens, prefill=pair.prefill,
                                  decode=pair.decode, kv_transport=kv_transport)
        codes = pair.stop()
    label = " (synthetic weights: the text is noise)" if res.synthetic else ""
    click.echo(f"\nmodel {res.model}{label}, backend {res.backend}, kv via {kv_transport}")
    click.echo(f"prompt: {prompt}\noutput: {res.text!r}\n")
    click.echo(f"{'stage':28s} {'ms':>10s}")
    for key, name in _STAGES:
        click.echo(f"{name:28s} {res.timings.get(key, 0.0):10.2f}")
    if "modeled_device_ms_per_token" in res.timings:  # FPGA backends: U55C bandwidth model
        click.echo(f"{'modeled U55C per token':28s} {res.timings['modeled_device_ms_per_token']:10.3f}")
    click.echo(f"{'KV bytes handed over':28s} {int(res.timings.get('kv_bytes', 0)):10d}")
    # The prefill names its region /hybrid-kv-<pid>-<epoch>: look for ours only.
    leftovers = glob.glob(f"/dev/shm/hybrid-kv-{pair.procs['prefill'].pid}-*")
    click.echo(f"\nshutdown: exit codes {codes}; /dev/shm leftovers: {sorted(leftovers) or 'none'}"
               f"; {time.perf_counter() - t0:.1f}s in all")
    if leftovers or any(codes.values()):
        raise SystemExit(1)
