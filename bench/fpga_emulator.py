"""Benchmark: the software U55C's decode vs the engine's single-process CPU decode.

Prints, for the same prompt and greedy decode, the emulator's wall ms/token and its
modeled U55C ms/token next to the engine's ms/token measured in the same run, and
checks the tokens agree (fp32 image).

    PYTHONPATH=. python bench/fpga_emulator.py --model synthetic:gpt2 --prompt-len 64 --new 32
"""

from __future__ import annotations

import time

import click


@click.command()
@click.option("--model", default="synthetic:gpt2", show_default=True)
@click.option("--prompt-len", default=64, show_default=True)
@click.option("--new", "n_new", default=32, show_default=True)
@click.option("--hbm-dtype", default="float32", show_default=True)
def main(model: str, prompt_len: int, n_new: int, hbm_dtype: str) -> None:
    import torch

    from engine.generate import generate
    from engine.loader import load_model
    from fpga_service.backends import make_backend
    from kernels.hbm_layout import HbmLayout
    from tests.fpga_helpers import prefill_packed, run_session

    torch.manual_seed(0)
    lm = load_model(model)
    prompt = torch.randint(0, lm.config.vocab_size, (prompt_len,)).tolist()
    t0 = time.perf_counter()
    ref = generate(lm, prompt, n_new)
    engine_ms = ref.timings["decode_ms"] / max(n_new - 1, 1)
    t1 = time.perf_counter()
    backend = make_backend("fpga-emu", model_spec=model, dtype="float32", hbm_dtype=hbm_dtype)
    t2 = time.perf_counter()
    first, layers = prefill_packed(lm, prompt, HbmLayout.for_model(lm.config, hbm_dtype))
    session_tokens = run_session(backend, first, layers, prompt_len, n_new)
    dev = backend.device.timings()
    steps = max(dev["steps"], 1)
    print(f"model {model} ({'synthetic' if lm.synthetic else 'checkpoint'}), HBM {hbm_dtype}, "
          f"{prompt_len}:{n_new}")
    print(f"engine CPU decode (baseline)   {engine_ms:8.2f} ms/token   (generate {t1 - t0:.1f} s)")
    print(f"emulator wall                  {dev['wall_ms'] / steps:8.2f} ms/token   "
          f"(load + pack {t2 - t1:.1f} s)")
    print(f"emulator modeled U55C          {dev['modeled_ms'] / steps:8.3f} ms/token")
    print(f"tokens equal: {session_tokens == ref.token_ids}")
    backend.close()


if __name__ == "__main__":
    main()
