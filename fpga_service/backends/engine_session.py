"""A request as a sequence of its backend's engine loop (engine/llm_engine.py): the
session only hands data to the loop and reads its token queue, so no request thread
ever issues device work. Backends with an `engine` attribute use it (gpu, fpga-*)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from engine.sequence import DecodeRequest

from .base import DecodeSession, DecodeSpec


class EngineSession(DecodeSession):
    """Construction reserves the sequence's KV memory (may wait, bounded, while it is
    full: call it off the event loop)."""

    def __init__(self, backend: Any, spec: DecodeSpec) -> None:
        self.backend, self.spec = backend, spec
        self.engine = backend.engine
        req = DecodeRequest(spec.n_prompt, spec.max_new_tokens, spec.sampling,
                            frozenset(spec.stop_ids), spec.ignore_eos, spec.request_id)
        self.seq = self.engine.open(req, backend.open_timeout_s)
        self._t0 = self._t1 = 0.0

    def ingest_layer(self, layer: int, data: memoryview | bytes) -> None:
        """Hand one layer to the loop without waiting (a view is copied first: the
        caller's buffer may change after the call)."""
        self.engine.ingest(self.seq, layer, data if isinstance(data, bytes) else bytes(data))

    def start(self, first_token: int) -> None:
        """The asynchronous path: decode from `first_token`; the caller reads `seq.out`."""
        self._t0 = time.perf_counter()
        self.engine.start(self.seq, first_token)

    def decode(self, first_token: int) -> Iterator[int]:
        self.start(first_token)
        try:
            yield from self.engine.tokens(self.seq)
        finally:
            self._t1 = time.perf_counter()

    def timings(self) -> dict[str, float]:
        end = self._t1 or time.perf_counter()
        ms = (end - self._t0) * 1e3 if self._t0 else 0.0
        n = max(1, self.seq.n_out - 1)  # tokens this stage made (the first is prefill's)
        return {"decode_ms": ms, "decode_ms_per_token": ms / n}

    def close(self) -> None:
        self.engine.cancel(self.seq)  # idempotent; a finished sequence is left as is
