"""Token sampling: greedy, temperature, top-k, top-p, with step-determined randomness.

The noise for generated index `step` comes from a CPU torch.Generator seeded with a
stable mix of (seed, step) and is drawn on the CPU whatever the logits' device, so any
process (prefill service, decode service, single-process run; CPU or GPU) continuing a
sequence samples the same token from the same logits.
"""

from __future__ import annotations

import torch

from engine.errors import InvalidArgument
from engine.sampling_params import SamplingParams, step_seed

__all__ = ["SamplingParams", "filter_logits", "sample", "step_seed"]

def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] fp32 -> same with tokens outside top-k / the top-p nucleus at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # stable: tied tokens keep index order, so the nucleus is the same on every
        # device and run (and holds the first maximum, torch.argmax's pick)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        drop_sorted = before >= top_p  # the first token always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> torch.Tensor:
    """logits [B, V] (or [V]) -> LongTensor[B] on the logits' device."""
    if logits.dim() == 1:
        logits = logits[None]
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    if params.seed is None:
        raise InvalidArgument("sampling needs a seed: call params.with_seed() once per request")
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    gen = torch.Generator(device="cpu").manual_seed(step_seed(params.seed, step))
    u = torch.rand(scaled.shape, generator=gen, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # Gumbel-max = softmax sampling
    return torch.argmax(scaled + gumbel.to(scaled.device, torch.float32), dim=-1)
