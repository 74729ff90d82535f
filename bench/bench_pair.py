"""End to end through the service pair vs single-process generation, same machine, same run.

    PYTHONPATH=. python bench/bench_pair.py --model synthetic:gpt2-medium --device cuda \
        --input 512 --output 512 --reps 5

Prints, per path, the median of `--reps` runs after one warm-up: total ms, TTFT, prefill,
raw and exposed KV transfer (the latency hiding), decode ms/token; and whether the pair's
tokens equal the local ones (greedy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root


def local_runs(model: str, device: str, ids: list[int], n_out: int, reps: int):
    from engine.generate import generate
    from engine.loader import load_model
    from engine.sampling import SamplingParams

    lm = load_model(model, device, "auto")
    generate(lm, ids, n_out, SamplingParams())  # warm-up
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = generate(lm, ids, n_out, SamplingParams())
        runs.append(((time.perf_counter() - t0) * 1e3, res))
    return lm, runs


@torch.no_grad()
def explain_divergence(lm, ids: list[int], local: list[int], other: list[int]) -> str:
    """Where two greedy token streams part, and how close the two candidates were there:
    the logits of both tokens after the shared prefix (one teacher-forced prefill). A gap
    of a few fp16 steps means a near-tie that any change in reduction order can flip."""
    from engine.kv_cache import KVCache

    i = next(j for j, (a, b) in enumerate(zip(local, other, strict=False)) if a != b)
    prefix = ids + local[:i]
    cache = KVCache(lm.config, 1, len(prefix), lm.device, lm.dtype)
    logits = lm.model.prefill(torch.tensor(prefix, device=lm.device), cache).float()
    a, b = logits[local[i]].item(), logits[other[i]].item()
    top = logits.topk(2).values.tolist()
    step = torch.finfo(lm.dtype).eps * max(abs(a), abs(b), 1e-3)   # one ulp-ish
    return (f"first difference at generated token {i}: local {local[i]} (logit {a:.4f}), "
            f"pair {other[i]} (logit {b:.4f}); gap {abs(a - b):.4f} = "
            f"{abs(a - b) / step:.1f} {lm.dtype} steps at that magnitude; top-2 gap there "
            f"{top[0] - top[1]:.4f}")


def pair_runs(model: str, device: str, backend: str, ids: list[int], n_out: int, reps: int,
              transport: str):
    from client.launch import ServicePair
    from client.remote import run_remote

    with tempfile.TemporaryDirectory() as logs, ServicePair(
            model=model, device=device, backend=backend, log_dir=logs,
            prefill_args=["--region-mb", "1024"]) as pair:
        def once():
            return run_remote(prompt_ids=ids, max_new_tokens=n_out, prefill=pair.prefill,
                              decode=pair.decode, kv_transport=transport, timeout_s=600)
        once()  # warm-up
        return [once() for _ in range(reps)]


def vocab_of(spec: str) -> int:
    from engine.config import ModelConfig, preset

    if spec.startswith("synthetic:"):
        return preset(spec.split(":")[1]).vocab_size
    return ModelConfig.from_hf(spec).vocab_size


def med(xs) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:gpt2-medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="gpu")
    ap.add_argument("--input", type=int, default=512)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kv-transport", default="shm", choices=["shm", "grpc"])
    a = ap.parse_args()
    ids = torch.randint(0, vocab_of(a.model), (a.input,),
                        generator=torch.Generator().manual_seed(0)).tolist()

    print(f"{a.model} on {a.device}, {a.input}:{a.output}, median of {a.reps} (+1 warm-up)")
    lm, local = local_runs(a.model, a.device, ids, a.output, a.reps)
    pair = pair_runs(a.model, a.device, a.backend, ids, a.output, a.reps, a.kv_transport)
    t = {k: med([r.timings[k] for r in pair]) for k in pair[0].timings}
    lt = med([ms for ms, _ in local])
    l_decode = med([r.timings["decode_ms"] / max(1, len(r.token_ids) - 1) for _, r in local])
    print(f"{'path':34s} {'total ms':>10s} {'TTFT ms':>9s} {'prefill':>8s} {'raw xfer':>9s} "
          f"{'exposed':>8s} {'ms/token':>9s}")
    l_prefill = med([r.timings["prefill_ms"] for _, r in local])  # local TTFT = its prefill
    print(f"{'local engine (baseline)':34s} {lt:10.1f} {l_prefill:9.2f} {l_prefill:8.2f} "
          f"{'-':>9s} {'-':>8s} {l_decode:9.3f}")
    print(f"{'pair, ' + a.backend + ' decode, kv ' + a.kv_transport:34s} {t['total_ms']:10.1f} "
          f"{t['ttft_ms']:9.2f} {t['prefill_ms']:8.2f} {t['transfer_ms']:9.3f} "
          f"{t['exposed_transfer_ms']:8.3f} {t['decode_ms_per_token']:9.3f}")
    hidden = 1 - t["exposed_transfer_ms"] / t["transfer_ms"] if t["transfer_ms"] else 0.0
    print(f"KV {t['kv_bytes'] / 1e6:.1f} MB; raw copy {t['kv_bytes'] / t['transfer_ms'] / 1e6:.1f} GB/s; "
          f"{100 * hidden:.0f}% of the copy hidden behind compute; pair/local total "
          f"{t['total_ms'] / lt:.2f}x")
    want = local[0][1].token_ids
    same = all(r.token_ids == want for r in pair)
    print(f"tokens equal to local (greedy): {same}")
    if not same:
        other = next(r.token_ids for r in pair if r.token_ids != want)
        print(explain_divergence(lm, ids, want, other))


if __name__ == "__main__":
    main()
