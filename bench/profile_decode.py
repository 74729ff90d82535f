"""Where a decode step's GPU time goes: kernels of one eager step (the same kernels the
CUDA graph replays), grouped by kind, beside the graph's replay time per token.

    PYTHONPATH=. python bench/profile_decode.py [--model gpt2-medium] [--ctx 512]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_reshape import graph_us
from engine.cuda_graph import GraphDecoder, bucket_len
from engine.fused_decode import fused_step_for
from engine.kv_cache import KVCache
from engine.loader import load_model

KINDS = (("gemv/gemm", ("gemm", "gemv", "cutlass", "sm90", "xmma", "cublas")),
         ("attention", ("flash", "fmha", "attention", "efficient", "attn_")),
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
    ap.add_argument("--fused", action="store_true", help="the fused kernels' step")
    a = ap.parse_args()
    lm = load_model(f"synthetic:{a.model}", device="cuda", dtype="float16")
    step = fused_step_for(lm.model) if a.fused else lm.model.decode_step
    if step is None:
        raise SystemExit("no fused step for this model / machine")
    cache = KVCache(lm.config, 1, bucket_len(a.ctx + 64, lm.config.max_positions), "cuda", lm.dtype)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.tensor([a.ctx], device="cuda")
    for _ in range(3):
        step(tok, pos, cache)
    torch.cuda.synchronize()
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(tok, pos, cache).argmax(-1)
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
    dec = GraphDecoder(lm.model, cache, step_fn=step)
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
    if a.fused:
        gemv_shapes(lm, step)


def gemv_shapes(lm, step) -> None:
    """ln_gemv alone at each of the model's shapes: time and bandwidth of its weights."""
    cfg, dc = lm.config, step.dc
    d, f, v = cfg.d_model, step.hidden.numel(), cfg.vocab_size
    x = torch.randn(max(d, f), device="cuda", dtype=lm.dtype)
    p = step.layers[0]
    cases = (("qkv + LayerNorm", p["qkv"], d, 3 * d, p["ln1"]), ("attn out", p["o"], d, d, (0, 0)),
             ("fc + LayerNorm + GELU", p["fc"], d, f, p["ln2"]), ("mlp proj", p["proj"], f, d, (0, 0)),
             ("lm head + LayerNorm", (step.wte, 0), d, v, step.ln_f))
    for label, w, k, n, ln in cases:
        out = torch.empty(n, device="cuda", dtype=torch.float32 if n == v else lm.dtype)

        def run(w=w, k=k, n=n, ln=ln, out=out):
            step._gemv(torch.cuda.current_stream().cuda_stream, x[:k], w, n, out, ln=ln,
                       f32=n == v)
        us = graph_us(run, 400)           # CUDA-graph replays: no Python launch cost
        if isinstance(us, str):
            print(f"  ln_gemv {label}: {us}")
            continue
        nbytes = n * k * x.element_size()
        print(f"  ln_gemv {label:24s} [{n} x {k}] {us:7.2f} us  {nbytes / us / 1e3:7.0f} GB/s "
              f"(grid {dc.gemv_grid(n)})")


if __name__ == "__main__":
    main()
