"""The prefill service's batch path without gRPC: the packed forward alone against the
same batch through PrefillRunner.run_batch (shipping every layer into region slots,
ready flags, first tokens), by batch size; `--profile` adds the top functions by
cumulative time of one run_batch (where the host time goes).

python -m bench.bench_prefill_batch --model synthetic:gpt2-medium --batch 1,8,32
"""

from __future__ import annotations

import concurrent.futures
import cProfile
import pstats
import time

import click
import torch

from engine.loader import load_model
from engine.sampling import SamplingParams
from gpu_service.runner import PrefillJob, PrefillRunner, future_notify
from transport.region import KvRegion


def _jobs(runner: PrefillRunner, region: KvRegion, b: int, n: int) -> list:
    cfg, jobs = runner.config, []
    for i in range(b):
        ids = [(7 * i + j) % cfg.vocab_size for j in range(n)]
        lb = runner.layer_bytes("dense", n)
        desc = region.alloc(lb * cfg.n_layers, cfg.n_layers, layout="dense",
                            dtype=runner.slot_dtype("dense"), n_tokens=n,
                            n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, checksums=True)
        box: concurrent.futures.Future = concurrent.futures.Future()
        jobs.append((PrefillJob(ids, desc, "dense", SamplingParams(), future_notify(box)), box))
    return jobs


def _batch_ms(runner, region, b: int, n: int, profile: bool = False) -> float:
    jobs = _jobs(runner, region, b, n)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    runner.run_batch([j for j, _ in jobs])
    for _, box in jobs:
        box.result(timeout=60)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    ms = (time.perf_counter() - t0) * 1e3
    for j, _ in jobs:
        region.free(j.desc)
    return ms


def _forward_ms(lm, b: int, n: int) -> float:
    ids = [torch.arange(n, device=lm.device) + i for i in range(b)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lm.model.prefill_packed(ids)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


@click.command()
@click.option("--model", default="synthetic:gpt2-medium")
@click.option("--dtype", default="float16")
@click.option("--batch", default="1,8,32")
@click.option("--tokens", default=64)
@click.option("--reps", default=5)
@click.option("--profile", is_flag=True)
def main(model, dtype, batch, tokens, reps, profile) -> None:
    lm = load_model(model, device="cuda", dtype=dtype)
    region = KvRegion.create(1 << 30, 256, lm.config.n_layers, 30.0)
    runner = PrefillRunner(lm, region)
    try:
        print(f"{model} {dtype}, {tokens}-token prompts, {torch.cuda.get_device_name()}")
        print("| batch | forward alone ms | run_batch ms (shipping, flags) |\n|---|---|---|")
        for b in (int(x) for x in batch.split(",")):
            for _ in range(2):  # warm-up
                _forward_ms(lm, b, tokens), _batch_ms(runner, region, b, tokens)
            fw = sorted(_forward_ms(lm, b, tokens) for _ in range(reps))[reps // 2]
            rb = sorted(_batch_ms(runner, region, b, tokens) for _ in range(reps))[reps // 2]
            print(f"| {b} | {fw:.2f} | {rb:.2f} |")
        if profile:
            for b in (1, 32):
                print(f"--- run_batch profile, batch {b}")
                _batch_ms(runner, region, b, tokens, profile=True)
    finally:
        region.close()


if __name__ == "__main__":
    main()
