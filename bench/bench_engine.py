"""Single-process engine generation vs HF transformers `generate()` on the same weights.

Not a test: prints our latency beside the baseline measured in the same run.

    PYTHONPATH=. python bench/bench_engine.py --model synthetic:gpt2-medium \\
        --device cuda --dtype float16 --shapes 64:64,512:512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.generate import generate
from engine.loader import load_model
from tests.helpers import hf_twin


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


@torch.inference_mode()
def hf_generate(model, ids, n_out: int, static: bool):
    kw = {"cache_implementation": "static"} if static else {}
    return model.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
                          attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:gpt2-medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--shapes", default="64:64,512:512")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-static", action="store_true", help="skip HF static-cache baseline")
    a = ap.parse_args()
    lm = load_model(a.model, a.device, a.dtype)
    hf = hf_twin(lm)
    print(f"model {a.model} device {lm.device} ({torch.cuda.get_device_name(lm.device) if lm.device.type == 'cuda' else 'cpu'}) dtype {lm.dtype}")
    print(f"{'in:out':>9} {'engine ms':>10} {'ms/token':>9} {'HF eager':>9} {'HF static':>10} same tokens")
    for shape in a.shapes.split(","):
        n_in, n_out = map(int, shape.split(":"))
        print(f"{shape:>9} " + bench_shape(lm, hf, n_in, n_out, a.reps, not a.no_static))


def bench_shape(lm, hf, n_in: int, n_out: int, reps: int, static: bool) -> str:
    ids = torch.randint(0, lm.config.vocab_size, (n_in,), generator=torch.Generator().manual_seed(n_in))
    prompt = ids.tolist()
    ours = time_ms(lambda: generate(lm, prompt, n_out, ignore_eos=True), lm.device, reps)
    res = generate(lm, prompt, n_out, ignore_eos=True)
    per_tok = res.timings["decode_ms"] / max(1, len(res.token_ids) - 1)
    dev_ids = ids[None].to(lm.device)
    eager = time_ms(lambda: hf_generate(hf, dev_ids, n_out, False), lm.device, reps)
    st = time_ms(lambda: hf_generate(hf, dev_ids, n_out, True), lm.device, reps) if static else float("nan")
    same = hf_generate(hf, dev_ids, n_out, False)[0, n_in:].tolist() == res.token_ids
    return f"{ours:10.1f} {per_tok:9.2f} {eager:9.1f} {st:10.1f} {same}"

if __name__ == "__main__":
    main()
