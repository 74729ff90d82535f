"""Helpers for the FPGA backend tests: single-process references and a prefill that
ships each layer in the HBM slot form, as the prefill service does."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.loader import LoadedModel
from engine.sampling import SamplingParams, sample
from fpga_service.backends.base import DecodeBackend, DecodeSpec
from kernels.hbm_layout import HbmLayout
from kernels.reshape import pack_layer

FAKE_PYXRT = str(Path(__file__).parent / "fake_pyxrt")
GREEDY = SamplingParams()
PROMPT = [5, 17, 42, 7, 99, 3, 250, 64, 11]


def reference(lm: LoadedModel, prompt: list[int], n: int,
              params: SamplingParams = GREEDY) -> list[int]:
    return generate(lm, prompt, n, params).token_ids


def prefill_packed(lm: LoadedModel, prompt: list[int], layout: HbmLayout,
                   params: SamplingParams = GREEDY) -> tuple[int, list[bytes]]:
    """Engine prefill; each layer's K, V packed by kernels.reshape as it is produced."""
    cache = KVCache(lm.config, 1, len(prompt), lm.device, lm.dtype)
    layers: list[bytes] = []

    def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layers.append(pack_layer(k, v, layout).numpy().tobytes())

    logits = lm.model.prefill(torch.tensor(prompt), cache, on_layer=on_layer)
    return int(sample(logits, params, 0)[0]), layers


def run_session(backend: DecodeBackend, first: int, layers: list[bytes], n_prompt: int,
                n: int, params: SamplingParams = GREEDY, rid: str = "r") -> list[int]:
    """Open, ingest every layer, decode, close: the servicer's sequence for one request."""
    session = backend.open_session(DecodeSpec(rid, n_prompt, n, params))
    try:
        for layer, data in enumerate(layers):
            session.ingest_layer(layer, memoryview(data))
        return [first, *session.decode(first)]
    finally:
        session.close()


def use_fake_pyxrt(monkeypatch):
    monkeypatch.syspath_prepend(FAKE_PYXRT)
    sys.modules.pop("pyxrt", None)
    import pyxrt

    pyxrt.FAULTS.update(no_device=False, state=None)
    pyxrt.CALLS.clear()
    return pyxrt
