"""`hybrid demo`: both services on this machine with a synthetic model, one prompt,
the text and the stage timings, then a clean shutdown. Decode runs on the FPGA backend
by default: the software U55C (`fpga-emu`) stands in where no card is, and the demo
prints its modeled U55C time per token; `--backend gpu` decodes with the engine."""

from __future__ import annotations

import glob
import tempfile
import time

import click

# (timings key, row name, what the row measures)
_STAGES = [
    ("ttft_ms", "time to first token", "request sent -> first token at the client"),
    ("queue_ms", "queue (both services)", "waiting for admission, prefill + decode"),
    ("prefill_ms", "prefill compute", "the prompt's forward pass on the prefill device"),
    ("transfer_ms", "KV copy, raw", "copying the KV cache into the shared region"),
    ("exposed_transfer_ms", "KV copy, not hidden", "the part of that copy compute did not hide"),
    ("ingest_ms", "decode ingest", "KV from the region into decode's device memory"),
    ("decode_ms", "decode loop", "generating the tokens after the first"),
    ("decode_ms_per_token", "decode per token", "decode loop / tokens generated there"),
    ("total_ms", "end to end", "the whole request as the client saw it"),
]


def stage_table(timings: dict) -> list[str]:
    """The demo's stage table: row name, milliseconds, what the row measures. The stages
    overlap (decode starts while prefill still copies): they do not add up to the total."""
    lines = [f"{'stage':28s} {'ms':>10s}  what it measures",
             *(f"{name:28s} {timings.get(key, 0.0):10.2f}  {what}" for key, name, what in _STAGES)]
    if "modeled_device_ms_per_token" in timings:  # FPGA backends: the U55C cycle model
        lines.append(f"{'modeled U55C per token':28s} "
                     f"{timings['modeled_device_ms_per_token']:10.3f}  "
                     f"the U55C cycle model's time per token (derived, not measured)")
    lines.append(f"{'KV bytes handed over':28s} {int(timings.get('kv_bytes', 0)):10d}  "
                 f"bytes of KV cache prefill passed to decode (not ms)")
    lines.append("(ms unless noted; stages overlap, so they do not add up to end to end)")
    return lines


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
    click.echo(f"\nmodel {res.model}{label}, backend {res.backend}, kv via {res.kv_path or kv_transport}")
    click.echo(f"prompt: {prompt}\noutput: {res.text!r}\n")
    for line in stage_table(res.timings):
        click.echo(line)
    # The prefill names its region /hybrid-kv-<pid>-<epoch>: look for ours only.
    leftovers = glob.glob(f"/dev/shm/hybrid-kv-{pair.procs['prefill'].pid}-*")
    click.echo(f"\nshutdown: exit codes {codes}; /dev/shm leftovers: {sorted(leftovers) or 'none'}"
               f"; {time.perf_counter() - t0:.1f}s in all")
    if leftovers or any(codes.values()):
        raise SystemExit(1)
