"""Decode and prefill speed of the engine on one GPU: eager vs CUDA graph, beside HF
transformers (static cache) and the weight-read roofline, measured in the same run.

    PYTHONPATH=. python bench/bench_decode.py [--model gpt2-medium] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.hf_baseline import hf_generate_ms, hf_model
from bench.sweep import roofline_ms_per_token
from engine.cuda_graph import GraphDecoder, bucket_len
from engine.fused_decode import fused_step_for
from engine.kv_cache import KVCache
from engine.loader import load_model


def _cuda_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def eager_ms_per_token(lm, n_prompt: int, n_steps: int) -> float:
    cache = KVCache(lm.config, 1, n_prompt + n_steps + 1, lm.device, lm.dtype)
    tok = torch.zeros(1, dtype=torch.long, device=lm.device)

    def loop():
        pos = torch.tensor([n_prompt], device=lm.device)
        for _ in range(n_steps):
            lm.model.decode_step(tok, pos, cache).argmax(-1)
            pos += 1
    loop()
    return _cuda_ms(loop) / n_steps


def graph_ms_per_token(lm, n_prompt: int, n_steps: int, step_fn=None) -> float:
    cache = KVCache(lm.config, 1, bucket_len(n_prompt + n_steps, lm.config.max_positions),
                    lm.device, lm.dtype)
    dec = GraphDecoder(lm.model, cache, step_fn)
    run = lambda: list(dec.run(1, n_prompt, n_steps))  # noqa: E731
    run()
    return _cuda_ms(run) / n_steps


def prefill_ms(lm, n: int) -> float:
    cache = KVCache(lm.config, 1, n, lm.device, lm.dtype)
    ids = torch.randint(0, lm.config.vocab_size, (n,), device=lm.device)
    lm.model.prefill(ids, cache)
    return _cuda_ms(lambda: lm.model.prefill(ids, cache))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    lm = load_model(f"synthetic:{a.model}", device="cuda", dtype="float16")
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    print(f"{torch.cuda.get_device_name()}  {a.model} fp16  weights {weight_bytes / 1e6:.0f} MB")
    roof_ms, gbps = roofline_ms_per_token(lm)
    print(f"  device-to-device copy: {gbps:.0f} GB/s -> weight-read roofline "
          f"{roof_ms:.3f} ms/token")
    print(f"  prefill {a.prompt} tokens: {prefill_ms(lm, a.prompt):.2f} ms")
    print(f"  decode eager      : {eager_ms_per_token(lm, a.prompt, a.tokens):.3f} ms/token")
    print(f"  decode CUDA graph, torch ops    : "
          f"{graph_ms_per_token(lm, a.prompt, a.tokens):.3f} ms/token")
    fused = fused_step_for(lm.model)
    if fused is not None:
        print(f"  decode CUDA graph, fused kernels: "
              f"{graph_ms_per_token(lm, a.prompt, a.tokens, fused):.3f} ms/token")
    if a.compile:
        t0 = time.perf_counter()
        fn = torch.compile(lm.model.decode_step, dynamic=False)
        ms = graph_ms_per_token(lm, a.prompt, a.tokens, fn)
        print(f"  decode compiled + CUDA graph: {ms:.3f} ms/token "
              f"(compile+capture {time.perf_counter() - t0:.0f} s)")
    if not a.no_hf:
        hf = hf_model(lm.config, "cuda", torch.float16)
        t1 = hf_generate_ms(hf, a.prompt, 1, True, "cuda")
        tn = hf_generate_ms(hf, a.prompt, a.tokens + 1, True, "cuda")
        print(f"  HF static cache   : {(tn - t1) / a.tokens:.3f} ms/token (prefill+1: {t1:.1f} ms)")


if __name__ == "__main__":
    main()
