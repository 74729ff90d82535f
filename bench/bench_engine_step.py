"""The engine's decode step alone, by batch size: GPU time of one captured bucket
(replays timed with CUDA events), the host loop around it (launch + collect, one step
in flight as the engine runs it), and the weight+KV read roofline of the same step.

python -m bench.bench_engine_step --model synthetic:gpt2-medium --batch 1,16,64,256
"""

from __future__ import annotations

import time

import click
import torch

from engine.block_manager import BlockManager
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.sequence import DecodeRequest, Sequence


def _rows(runner: ModelRunner, b: int, ctx: int, new: int) -> list[Sequence]:
    blocks = BlockManager(runner.cache.n_blocks, runner.cache.block_size)
    rows = []
    for _ in range(b):
        s = Sequence(DecodeRequest(ctx, new))
        s.blocks = blocks.allocate(s.n_reserve)
        s.token, s.position = 1, ctx
        rows.append(s)
    return rows


def _gpu_ms(runner: ModelRunner, bucket: int, n: int) -> float:
    graph, _ = runner.graphs[bucket]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _host_ms(runner: ModelRunner, rows: list[Sequence], n: int) -> float:
    pending = runner.launch(rows, frozenset(s.seq_id for s in rows))
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = runner.launch(rows)
        runner.collect(pending)
        pending = nxt
    runner.collect(pending)
    return (time.perf_counter() - t0) * 1e3 / n


@click.command()
@click.option("--model", default="synthetic:gpt2-medium")
@click.option("--dtype", default="float16")
@click.option("--batch", default="1,16,64,256")
@click.option("--ctx", default=128, help="context length of every row")
@click.option("--steps", default=50)
def main(model: str, dtype: str, batch: str, ctx: int, steps: int) -> None:
    lm = load_model(model, device="cuda", dtype=dtype)
    sizes = [int(b) for b in batch.split(",")]
    cfg = lm.config
    with torch.inference_mode():
        runner = ModelRunner(lm, max(sizes))
        weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        print(f"{model} {dtype} on {torch.cuda.get_device_name()}; ctx {ctx}; "
              f"fused 1-row: {runner.fused is not None}; paged kernel: "
              f"{runner.cache.attention_kernel is not None}")
        print("| batch | GPU ms/step | host loop ms/step | tok/s (host loop) | roofline ms |")
        print("|---|---|---|---|---|")
        for b in sizes:
            rows = _rows(runner, b, ctx, steps * 2 + 8)
            host = _host_ms(runner, rows, steps)
            gpu = _gpu_ms(runner, runner.bucket_for(b), steps)
            kv = b * (ctx + steps) * cfg.kv_bytes_per_token(lm.dtype.itemsize)
            roof = (weights + kv) / 4.0e12 * 1e3  # ~4 TB/s usable HBM3e
            print(f"| {b} | {gpu:.3f} | {host:.3f} | {b / host * 1e3:,.0f} | {roof:.3f} |")
            runner.reset()


if __name__ == "__main__":
    main()
