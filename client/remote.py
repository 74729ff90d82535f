"""`hybrid generate` without --local: one request through the service pair, blocking."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from engine.sampling import SamplingParams

from .api import HybridClient, RemoteResult


def generate_remote(
    prompt: str | None = None, *, prompt_ids: Iterable[int] | None = None,
    max_new_tokens: int, params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen
    prefill: str = "localhost:50051", decode: str = "localhost:50052",
    kv_transport: str = "shm", stop_ids: Iterable[int] = (), ignore_eos: bool = False,
    on_text: Callable[[str], None] | None = None, timeout_s: float = 120.0,
) -> RemoteResult:
    """Generate through the services; text pieces go to `on_text` as they arrive.
    Raises the engine.errors class of the gRPC status (one clear message)."""

    async def run() -> RemoteResult:
        async with HybridClient(prefill, decode, timeout_s) as client:
            return await client.generate(
                prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, params=params,
                stop_ids=stop_ids, ignore_eos=ignore_eos, kv_transport=kv_transport,
                on_text=on_text)

    return asyncio.run(run())
