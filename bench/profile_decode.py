"""Where a decode step's GPU time goes: kernels of one eager step (the same kernels the
CUDA graph replays), grouped by kind, beside the graph's replay time per token.

    PYTHONPATH=. python bench/profile_decode.py [--model gpt2-medium] [--ctx 512]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from engine.cuda_graph import GraphDecoder, bucket_len
from engine.kv_cache import KVCache
from engine.loader import load_model

KINDS = (("gemv/gemm", ("gemm", "gemv", "cutlass", "sm90", "xmma", "cublas")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ("layernorm", ("layer_norm", "layernorm")),
         ("index/copy", ("index", "copy", "scatter", "put")))


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(x in low for x in keys):
            return k
    return "elementwise/other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    lm = load_model(f"synthetic:{a.model}", device="cuda", dtype="float16")
    cache = KVCache(lm.config, 1, bucket_len(a.ctx + 64, lm.config.max_positions), "cuda", lm.dtype)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.tensor([a.ctx], device="cuda")
    for _ in range(3):
        lm.model.decode_step(tok, pos, cache)
    torch.cuda.synchronize()
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            lm.model.decode_step(tok, pos, cache).argmax(-1)
        torch.cuda.synchronize()
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kind[kind(e.name)]
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total_us = sum(v[1] for v in per_kind.values()) / steps
    n_kernels = sum(v[0] for v in per_kind.values()) / steps
    print(f"{torch.cuda.get_device_name()} {a.model} fp16, context {a.ctx}: "
          f"{n_kernels:.0f} kernels/step, GPU busy {total_us / 1e3:.3f} ms/step")
    for name, (n, us) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:18s} {n / steps:6.0f} kernels  {us / steps / 1e3:7.3f} ms  "
              f"({100 * us / steps / total_us:4.1f}%)  avg {us / max(n, 1):6.2f} us")
    dec = GraphDecoder(lm.model, cache)
    list(dec.run(1, a.ctx, 32))
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(100):
        dec.graph.replay()
    t1.record()
    torch.cuda.synchronize()
    print(f"  graph replay: {t0.elapsed_time(t1) / 100:.3f} ms/step (includes launch gaps "
          f"between its {n_kernels:.0f} kernels)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
