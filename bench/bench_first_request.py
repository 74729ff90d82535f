"""First-request latency of a freshly started service pair, with and without warm-up.

    PYTHONPATH=. python bench/bench_first_request.py --model synthetic:gpt2-medium \
        --device cuda --backend gpu --input 128 --output 16

Starts the pair `--starts` times each way (`--no-warm-up` is the baseline, measured in
the same run), waits `--idle-s`, sends `--requests` requests one after another to each
fresh pair, and
prints per request index the median TTFT and total ms, plus the time until both services
said SERVING. The first request of a pair without warm-up pays for kernel compiles,
library set-up and the first CUDA-graph capture; with warm-up the start pays instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root


def one_pair(a: argparse.Namespace, warm: bool) -> tuple[float, list[tuple[float, float]]]:
    """(seconds until SERVING, [(ttft_ms, total_ms) per request])."""
    from client.launch import ServicePair
    from client.remote import run_remote

    flag = ["--warm-up" if warm else "--no-warm-up"]
    ids = [(7 * i) % 250 + 1 for i in range(a.input)]
    t0 = time.perf_counter()
    with ServicePair(model=a.model, device=a.device, backend=a.backend, prefill_args=flag,
                     decode_args=flag) as pair:
        start_s = time.perf_counter() - t0
        time.sleep(a.idle_s)  # traffic rarely starts the instant both say SERVING
        out = []
        for _ in range(a.requests):
            r = run_remote(prompt_ids=ids, max_new_tokens=a.output, prefill=pair.prefill,
                           decode=pair.decode, timeout_s=300)
            out.append((r.timings["ttft_ms"], r.timings["total_ms"]))
    return start_s, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="gpu")
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--output", type=int, default=8)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--starts", type=int, default=2)
    p.add_argument("--idle-s", type=float, default=1.0,
                   help="wait between SERVING and the first request (background set-up)")
    a = p.parse_args()
    print(f"{a.model} on {a.device}, backend {a.backend}, {a.input}:{a.output}, "
          f"{a.starts} fresh pairs each way, {a.requests} requests each (medians)")
    print(f"{'warm-up':>8} {'start s':>8} " + " ".join(
        f"{'req' + str(i) + ' ttft':>10} {'total':>8}" for i in range(a.requests)))
    for warm in (False, True):  # the baseline first
        runs = [one_pair(a, warm) for _ in range(a.starts)]
        start = statistics.median(s for s, _ in runs)
        cells = []
        for i in range(a.requests):
            cells.append(f"{statistics.median(r[i][0] for _, r in runs):>10.1f} "
                         f"{statistics.median(r[i][1] for _, r in runs):>8.1f}")
        print(f"{'on' if warm else 'off':>8} {start:>8.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
