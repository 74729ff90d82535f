"""Driving a DecodeEngine the way the decode service does: KV from a separate prefill,
ingested layer by layer, then decode from a given first token."""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from engine.llm_engine import DecodeEngine
from engine.sampling import SamplingParams
from engine.sequence import DecodeRequest


def prefill_kv(lm, prompt: list[int]) -> tuple[KVCache, int]:
    """A dense cache of the prompt and its greedy first token."""
    cache = KVCache(lm.config, 1, len(prompt), lm.device, lm.dtype)
    logits = lm.model.prefill(torch.tensor(prompt, device=lm.device), cache)
    return cache, int(logits.argmax())


def open_and_ingest(engine: DecodeEngine, lm, prompt: list[int], max_new: int,
                    params: SamplingParams = SamplingParams(), **kw):  # noqa: B008
    cache, _ = prefill_kv(lm, prompt)
    seq = engine.open(DecodeRequest(len(prompt), max_new, params.with_seed(), **kw))
    for layer in range(lm.config.n_layers):
        engine.ingest(seq, layer, (cache.k[layer, 0].cpu(), cache.v[layer, 0].cpu()))
    return seq


def continue_in_engine(lm, prompt: list[int], first: int, max_new: int,
                       params: SamplingParams, ignore_eos: bool = False) -> list[int]:
    """[first, *decoded] from a fresh engine (first token delivered too)."""
    engine = DecodeEngine(lm, max_batch=4)
    try:
        seq = open_and_ingest(engine, lm, prompt, max_new, params, ignore_eos=ignore_eos)
        engine.start(seq, first, deliver=True)
        return list(engine.tokens(seq, timeout_s=60))
    finally:
        engine.close()
