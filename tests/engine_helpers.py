"""Driving a DecodeEngine the way the decode service does: KV from a separate prefill,
ingested layer by layer, then decode from a given first token."""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVCache
from engine.llm_engine import DecodeEngine
from engine.sampling import SamplingParams
from engine.sequence import DecodeRequest, Sequence


def prefill_kv(lm, prompt: list[int]) -> tuple[KVCache, int]:
    """A dense cache of the prompt and its greedy first token."""
    cache = KVCache(lm.config, 1, len(prompt), lm.device, lm.dtype)
    logits = lm.model.prefill(torch.tensor(prompt, device=lm.device), cache)
    return cache, int(logits.argmax())


def paged_seqs(lm, runner, prompts: list[list[int]], max_new: int = 8) -> list[Sequence]:
    """Sequences with their prompts' KV in `runner`'s paged pool (a ModelRunner), each
    ready to step from its greedy first token."""
    blocks = BlockManager(runner.cache.n_blocks, runner.cache.block_size)
    out = []
    for p in prompts:
        cache, first = prefill_kv(lm, p)
        s = Sequence(DecodeRequest(len(p), max_new))
        s.blocks = blocks.allocate(s.n_reserve)
        slots = runner.cache.slots_of(s.blocks, 0, len(p))
        for layer in range(lm.config.n_layers):
            runner.write_kv(layer, slots, cache.k[layer, 0], cache.v[layer, 0])
        s.token, s.position = first, len(p)
        out.append(s)
    return out


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
