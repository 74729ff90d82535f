"""Token sampling: greedy, temperature, top-k, top-p, with step-determined randomness.

The noise for generated index `step` comes from a CPU torch.Generator seeded with a
stable mix of (seed, step) and is drawn on the CPU whatever the logits' device, so any
process (prefill service, decode service, single-process run; CPU or GPU) continuing a
sequence samples the same token from the same logits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import torch

from engine.errors import InvalidArgument

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_seed(self) -> SamplingParams:
        """A copy with a seed fixed once per request (random if none was given), so all
        steps of one request, wherever they run, share it."""
        if self.seed is not None or self.greedy:
            return self
        return replace(self, seed=secrets.randbits(63))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step); pure integer arithmetic, stable."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1


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
